"""The package's layering rule, enforced (see the table in sdlearn/__init__.py).

Read from the source with ``ast`` (nothing is imported), counting every import: module-level and inside
functions, ``import a.b``, ``from a import b``, relative imports, and ``importlib.import_module("sdlearn.x")``
with a literal name (the old way around an import cycle). The rules:

(a) the import graph of ``sdlearn`` has no cycle;
(b) no module imports another sdlearn module's ``_private`` names (``from sdlearn.x import _y``, or
    ``x._y`` through an imported module);
(c) no module is over 1,000 lines;
(d) every module sits in one layer of :data:`LAYERS`, and imports only from its own layer or lower ones;
    within a layer only along the edges :data:`WITHIN_LAYER` allows.

The last tests run the same checks on a small fake package written into ``tmp_path``, with one of each
mistake, so a checker that has stopped catching anything fails too.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import NamedTuple

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "sdlearn"
MAX_LINES = 1000

# The layers, lowest first. Within a layer the modules are listed in their rows' order; a name ending in
# ".*" stands for a package's submodules, which share the package's row.
LAYERS: list[tuple[str, list[str]]] = [
    ("foundations", ["sdlearn.checks", "sdlearn.checkpoint", "sdlearn.images", "sdlearn.captions", "sdlearn.data", "sdlearn.schedules",
                     "sdlearn.stats"]),
    ("models and losses", ["sdlearn.vae", "sdlearn.denoiser", "sdlearn.unet", "sdlearn.text", "sdlearn.metrics",
                           "sdlearn.samplers", "sdlearn.flow", "sdlearn.adapt", "sdlearn.control", "sdlearn.distill"]),
    ("the generic loop", ["sdlearn.training"]),
    ("assembly", ["sdlearn.pipeline", "sdlearn.pretrained", "sdlearn.stable_diffusion"]),
    ("recipes", ["sdlearn.denoiser_data", "sdlearn.recipes", "sdlearn.own_data", "sdlearn.adapt_recipes", "sdlearn.control_recipes",
                 "sdlearn.distill_recipes"]),
    ("interfaces", ["sdlearn.plotting", "sdlearn.widgets", "sdlearn.exercises", "sdlearn.exercises.*", "sdlearn.__main__",
                    "sdlearn"]),
]
# What a module may import from its own layer: "earlier rows" (a module listed before it), or exactly the listed
# (importer, imported) edges. A package and its own submodules (one row) may always import each other; test (a)
# keeps them acyclic.
WITHIN_LAYER: dict[str, str | set[tuple[str, str]]] = {
    "foundations": "earlier rows",
    "models and losses": {("sdlearn.text", "sdlearn.denoiser"),  # the text encoder reuses the denoiser's attention
                          ("sdlearn.flow", "sdlearn.samplers"),  # the flow samplers share the samplers' interface
                          ("sdlearn.adapt", "sdlearn.text"),  # a new word is added to the tokenizer and text encoder
                          ("sdlearn.control", "sdlearn.denoiser"),  # the ControlNet copies the DiT's blocks
                          ("sdlearn.distill", "sdlearn.denoiser"),  # the consistency student wraps the DiT
                          ("sdlearn.distill", "sdlearn.samplers")},  # its sampler has the samplers' interface
    "the generic loop": set(),
    "assembly": {("sdlearn.pretrained", "sdlearn.pipeline")},  # load_pipeline builds a pipeline
    "recipes": {("sdlearn.recipes", "sdlearn.denoiser_data"),  # the denoiser's recipe on its data
                ("sdlearn.distill_recipes", "sdlearn.denoiser_data"),  # the student learns on the teacher's data
                ("sdlearn.own_data", "sdlearn.recipes"),  # your own images, on the recipes' skeleton
                ("sdlearn.adapt_recipes", "sdlearn.recipes"),  # the adapter's training record, as every recipe's
                ("sdlearn.control_recipes", "sdlearn.recipes"),  # the ControlNet's, on the same skeleton
                ("sdlearn.distill_recipes", "sdlearn.recipes")},  # the student's: the teacher's latents and record
    "interfaces": "earlier rows",
}


# ------------------------------------------------------------------------------------------------------------
# The checker


class Import(NamedTuple):
    importer: str  # the module that imports, e.g. "sdlearn.text"
    target: str  # the package module imported from, e.g. "sdlearn.denoiser"
    name: str | None  # the name taken from it (``from target import name``, ``target.name``), if any
    line: int

    def where(self) -> str:
        what = f"{self.target}.{self.name}" if self.name else self.target
        return f"{self.importer} (line {self.line}) imports {what}"


def find_modules(package_dir: Path) -> dict[str, Path]:
    """Every module of the package in ``package_dir``, by dotted name (a package's ``__init__`` by the package's)."""
    root = package_dir.parent
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _owning_module(dotted: str, modules: dict[str, Path]) -> tuple[str, str | None] | None:
    """``"pkg.a.b.name"`` → ``("pkg.a.b", "name")``: the longest prefix that is a module, then the next part."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        module = ".".join(parts[:cut])
        if module in modules:
            return module, (parts[cut] if cut < len(parts) else None)
    return None


def _attribute_chain(node: ast.Attribute) -> list[str] | None:
    """``a.b.c`` → ``["a", "b", "c"]``; None when the chain does not start at a plain name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(parts)]


def scan_imports(modules: dict[str, Path]) -> list[Import]:
    """Every import of one package module by another, anywhere in the source (functions included)."""
    package = min(modules, key=len).split(".")[0]
    return [imp for importer, path in modules.items() for imp in _scan_module(importer, path, modules, package)]


def _scan_module(importer: str, path: Path, modules: dict[str, Path], package: str) -> list[Import]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    base = importer if path.name == "__init__.py" else importer.rpartition(".")[0]  # what "." means here
    aliases: dict[str, str] = {}  # a local name bound to a package module → that module
    found: list[Import] = []

    def add(dotted: str, line: int, name: str | None = None) -> None:
        if dotted != package and not dotted.startswith(package + "."):
            return
        owner = _owning_module(dotted if name is None else f"{dotted}.{name}", modules)
        if owner is not None and owner[0] != importer:
            found.append(Import(importer, owner[0], owner[1], line))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
                top = alias.name.split(".")[0]
                aliases[alias.asname or top] = alias.name if alias.asname else top
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base.split(".")
                root = ".".join(parts[: len(parts) - node.level + 1])
                source = f"{root}.{node.module}" if node.module else root
            else:
                source = node.module or ""
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if submodule in modules:
                    add(submodule, node.lineno)
                    aliases[alias.asname or alias.name] = submodule
                else:
                    add(source, node.lineno, alias.name)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                add(node.args[0].value, node.lineno)
    # x._y where x is a package module bound by an import: a private name reached by attribute
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            chain = _attribute_chain(node)
            if chain is None or chain[0] not in aliases:
                continue
            owner = _owning_module(".".join([aliases[chain[0]], *chain[1:]]), modules)
            if owner is not None and owner[1] is not None and owner[1].startswith("_") and owner[0] != importer:
                found.append(Import(importer, owner[0], owner[1], node.lineno))
    return found


def import_graph(modules: dict[str, Path], imports: list[Import]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for imp in imports:
        graph[imp.importer].add(imp.target)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (each holds at least one cycle), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(components)


def shortest_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A shortest way from the component's first module back to itself, e.g. ``[a, b, a]``."""
    start, members = component[0], set(component)
    paths = {start: [start]}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & members):
            if w == start:
                return paths[v] + [start]
            if w not in paths:
                paths[w] = paths[v] + [w]
                queue.append(w)
    raise AssertionError(f"{component} is not a cycle")


def private_imports(imports: list[Import]) -> list[Import]:
    """The imports of another module's ``_private`` name (dunders such as ``__version__`` are public), each once."""
    return sorted({imp for imp in imports if imp.name and imp.name.startswith("_") and not imp.name.startswith("__")})


def long_modules(modules: dict[str, Path], limit: int = MAX_LINES) -> dict[str, int]:
    sizes = {m: len(p.read_text(encoding="utf-8").splitlines()) for m, p in modules.items()}
    return {m: n for m, n in sizes.items() if n > limit}


def place(module: str, layers: list[tuple[str, list[str]]]) -> tuple[int, int] | None:
    """``(layer number, row number)`` of a module in the table, or None when it is not in it."""
    for layer_number, (_, rows) in enumerate(layers):
        for row_number, entry in enumerate(rows):
            if module == entry or (entry.endswith(".*") and module.startswith(entry[:-1])):
                package = entry[:-2] if entry.endswith(".*") else None
                if package is not None and package in rows:
                    row_number = rows.index(package)  # a package's submodules share its row
                return layer_number, row_number
    return None


def unplaced_modules(modules: dict[str, Path], layers: list[tuple[str, list[str]]]) -> list[str]:
    return sorted(m for m in modules if place(m, layers) is None)


def layer_violations(imports: list[Import], layers: list[tuple[str, list[str]]],
                     within: dict[str, str | set[tuple[str, str]]]) -> list[str]:
    """Every import that goes up a layer, or sideways along an edge its layer does not allow."""
    problems = []
    for imp in imports:
        here, there = place(imp.importer, layers), place(imp.target, layers)
        if here is None or there is None:
            continue  # unplaced_modules reports those
        layer_name, target_layer = layers[here[0]][0], layers[there[0]][0]
        if there[0] > here[0]:
            problems.append(f"{imp.where()}: up from layer {layer_name!r} to the higher layer {target_layer!r}")
        elif there[0] == here[0]:
            rule = within[layer_name]
            if there[1] == here[1]:
                allowed = True  # a package and its own submodules share a row
            elif rule == "earlier rows":
                allowed = there[1] < here[1]
            else:
                allowed = (imp.importer, imp.target) in rule
            if not allowed:
                problems.append(f"{imp.where()}: sideways within layer {layer_name!r} along an edge it does not allow "
                                f"(allowed: {rule if isinstance(rule, str) else sorted(rule) or 'none'})")
    return sorted(set(problems))


# ------------------------------------------------------------------------------------------------------------
# The rules, on sdlearn


@pytest.fixture(scope="module")
def modules():
    found = find_modules(PACKAGE_DIR)
    assert "sdlearn" in found and "sdlearn.data" in found, f"no sdlearn package found in {PACKAGE_DIR}"
    return found


@pytest.fixture(scope="module")
def imports(modules):
    return scan_imports(modules)


def test_the_import_graph_has_no_cycle(modules, imports):
    graph = import_graph(modules, imports)
    cycles = find_cycles(graph)
    report = []
    for component in cycles:
        edges: dict[tuple[str, str], int] = {}
        for imp in imports:
            if imp.importer in component and imp.target in component:
                edges[imp.importer, imp.target] = min(imp.line, edges.get((imp.importer, imp.target), imp.line))
        involved = [f"{a} -> {b} (line {line})" for (a, b), line in sorted(edges.items())]
        report.append(f"modules {', '.join(component)}; e.g. {' -> '.join(shortest_cycle(graph, component))}; "
                      "the imports between them:\n    " + "\n    ".join(involved))
    assert not cycles, ("import cycle(s) in sdlearn (function-level imports count too): move the shared code down "
                        "a layer instead of importing inside a function\n  " + "\n  ".join(report))


def test_no_module_imports_another_modules_private_names(imports):
    private = private_imports(imports)
    assert not private, ("modules import other modules' _private names; make the name public (no underscore) in "
                         "its module, or move it:\n  " + "\n  ".join(imp.where() for imp in private))


def test_no_module_is_over_1000_lines(modules):
    long = long_modules(modules)
    assert not long, (f"modules over {MAX_LINES:,} lines; split them:\n  "
                      + "\n  ".join(f"{m}: {n:,} lines" for m, n in sorted(long.items())))


def test_every_module_is_placed_in_a_layer(modules):
    missing = unplaced_modules(modules, LAYERS)
    assert not missing, (f"modules not in the layer table: {', '.join(missing)}; add each to LAYERS in "
                         "tests/test_layers.py (and to the table in sdlearn/__init__.py), in the layer it belongs to")


def test_imports_go_down_the_layers_or_along_allowed_edges(imports):
    problems = layer_violations(imports, LAYERS, WITHIN_LAYER)
    assert not problems, ("imports that break the layer order (lowest first: "
                          + " < ".join(name for name, _ in LAYERS) + "):\n  " + "\n  ".join(problems))


def test_the_layer_table_names_only_modules_that_exist(modules):
    listed = [entry for _, rows in LAYERS for entry in rows]
    stale = [e for e in listed if not e.endswith(".*") and e not in modules]
    assert not stale, f"LAYERS names modules that no longer exist: {', '.join(stale)}; remove them"
    assert len(listed) == len(set(listed)), "a module is listed twice in LAYERS"


# ------------------------------------------------------------------------------------------------------------
# The checker catches what it should


def write_package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "fake"


FAKE_LAYERS = [
    ("base", ["fake.low", "fake.util"]),
    ("middle", ["fake.a", "fake.b", "fake.sub", "fake.sub.*"]),
    ("top", ["fake"]),
]
FAKE_WITHIN = {"base": "earlier rows", "middle": {("fake.b", "fake.a")}, "top": "earlier rows"}


def test_the_checker_catches_each_kind_of_mistake(tmp_path):
    package = write_package(tmp_path, {
        "fake/__init__.py": "",
        "fake/low.py": "_SECRET = 1\n",
        "fake/util.py": ("import fake.sub.inner  # up a layer\n\ndef f():\n    from . import low\n"
                         "    return low._SECRET  # a private name, by attribute\n"),
        "fake/a.py": "def g():\n    from fake.b import helper  # a cycle, through a function-level import\n",
        "fake/b.py": "from .a import g\nfrom fake.low import _SECRET\n\ndef helper():\n    pass\n",
        "fake/sub/__init__.py": "from .inner import x\n",
        "fake/sub/inner.py": "import importlib\nx = 1\nmod = importlib.import_module('fake.a')\n",
        "fake/big.py": "x = 1\n" * (MAX_LINES + 1),  # too long, and not in the table
    })
    modules = find_modules(package)
    assert set(modules) == {"fake", "fake.low", "fake.util", "fake.a", "fake.b", "fake.sub", "fake.sub.inner", "fake.big"}
    imports = scan_imports(modules)

    graph = import_graph(modules, imports)
    assert find_cycles(graph) == [["fake.a", "fake.b"]]
    assert shortest_cycle(graph, ["fake.a", "fake.b"]) == ["fake.a", "fake.b", "fake.a"]
    assert sorted(imp.where() for imp in private_imports(imports)) == [
        "fake.b (line 2) imports fake.low._SECRET",
        "fake.util (line 5) imports fake.low._SECRET",
    ]
    assert long_modules(modules) == {"fake.big": MAX_LINES + 1}
    assert unplaced_modules(modules, FAKE_LAYERS) == ["fake.big"]
    problems = layer_violations(imports, FAKE_LAYERS, FAKE_WITHIN)
    assert len(problems) == 3, problems
    assert problems[0].startswith("fake.a (line 2) imports fake.b.helper: sideways within layer 'middle'")
    assert problems[1].startswith("fake.sub.inner (line 3) imports fake.a: sideways within layer 'middle'")
    assert problems[2].startswith("fake.util (line 1) imports fake.sub.inner: up from layer 'base' to the higher "
                                  "layer 'middle'")
    # the allowed imports were seen, and not reported: b -> a (listed), sub -> sub.inner (its own package),
    # util -> low (an earlier row)
    assert {("fake.b", "fake.a"), ("fake.sub", "fake.sub.inner"), ("fake.util", "fake.low")} <= set(graph_edges(imports))


def graph_edges(imports: list[Import]) -> list[tuple[str, str]]:
    return [(imp.importer, imp.target) for imp in imports]


@pytest.mark.parametrize(
    "importer, target, expected",
    [
        ("fake.util", "fake.low", None),  # an earlier row of the same layer
        ("fake.low", "fake.util", "sideways within layer 'base'"),  # a later row
        ("fake.b", "fake.a", None),  # a listed edge
        ("fake.a", "fake.b", "sideways within layer 'middle'"),  # its reverse is not listed
        ("fake.sub.inner", "fake.sub", None),  # inside one package
        ("fake.a", "fake.low", None),  # down a layer
        ("fake", "fake.sub.inner", None),
        ("fake.sub.inner", "fake", "up from layer 'middle' to the higher layer 'top'"),
    ],
)
def test_the_layer_rule_edge_by_edge(importer, target, expected):
    problems = layer_violations([Import(importer, target, None, 1)], FAKE_LAYERS, FAKE_WITHIN)
    if expected is None:
        assert problems == []
    else:
        assert len(problems) == 1 and expected in problems[0], problems


def test_the_checker_passes_a_clean_package(tmp_path):
    package = write_package(tmp_path, {
        "fake/__init__.py": "from fake.a import g\n",
        "fake/low.py": "PUBLIC = 1\n",
        "fake/util.py": "from fake.low import PUBLIC\nfrom fake import low\n\nx = low.PUBLIC + PUBLIC\n",
        "fake/a.py": "import fake.low as low\n\ndef g():\n    return low.__name__\n",
        "fake/b.py": "from . import a\n",
        "fake/sub/__init__.py": "",
    })
    modules = find_modules(package)
    imports = scan_imports(modules)
    assert {(imp.importer, imp.target) for imp in imports} == {
        ("fake", "fake.a"), ("fake.util", "fake.low"), ("fake.a", "fake.low"), ("fake.b", "fake.a")}
    assert find_cycles(import_graph(modules, imports)) == []
    assert private_imports(imports) == [] and long_modules(modules) == {}
    assert unplaced_modules(modules, FAKE_LAYERS) == []
    assert layer_violations(imports, FAKE_LAYERS, FAKE_WITHIN) == []
