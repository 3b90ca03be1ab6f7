"""The course's review, automated where it can be (issue 18, item 5): cited files and quoted numbers.

Pure functions on notebooks (``nbformat`` nodes or the plain JSON dicts) and on source text; no pytest here.
``tests/test_review.py`` runs them over the course. Two rules:

**1. A cited file is in the repository.** ``cited_missing_files`` finds citations of repository files

* in a markdown cell, and in the comments of a code cell (and in the docstrings and comments of a module):
  a relative link ``[text](path)`` (not ``http:``, ``https:``, ``mailto:``, ``#anchor``), and a path, backticked
  or plain, that ends in ``.md .py .ipynb .json .txt .safetensors .toml .cfg`` (``PATH`` below);
* in a code cell's (or module's) other string literals: only a string that starts with a top-level folder of the
  repository (``notebooks/ sdlearn/ benchmarks/ tests/ docs/ .ci/``), so file names made at run time
  (``f"{out}/x.png"``, ``"my_copy.ipynb"``, ``runs/...``, ``~/...``) never count;
* the words ``DESIGN §`` and ``DESIGN.md``: always a failure, since the design notes are not in the repository
  (cite the README, a module or a paper instead).

A path is looked up relative to the repository root, then to the citing file's folder, and must exist there. A
path with ``*`` must match at least one file. A path with a folder is a citation when it starts with a top-level
folder, ``./`` or ``../``, or a folder that exists at the root or beside the citing file; any other
(``out_dir/vae.safetensors``, an SD folder's ``unet/config.json``) names a file outside the repository. A
markdown link's target is always a citation. Not citations: a path with ``{`` or ``$`` (made at run time), an
absolute or ``~`` path, a URL, a path under ``runs/``, a path whose first folder is an UPPER-CASE placeholder
(``FOLDER/captions.json``, ``SD_PATH/unet/``), a path with an UPPER-CASE placeholder (``NN_*.ipynb``,
``PATH.json``, ``unet-YYYYMMDD-HHMM.txt``) that no repository file has, and module names (``sdlearn.data``
ends in none of the suffixes). A bare file name (no folder) passes when some repository file has that name
(``unet.safetensors``, the weights in ``sdlearn/weights/``); a bare ``.json .txt .safetensors .toml .cfg`` name
that no repository file has names a file of some other folder (diffusers' ``model_index.json``) and is not a
citation, while a bare ``.md .py .ipynb`` name that no repository file has is a failure. In code (comments,
docstrings) a bare name counts only when it is a course notebook's (``03_vae.ipynb``), since ``# writes
my_copy.ipynb`` names a file made at run time.

**2. A number the prose quotes was printed.** ``unsupported_numbers`` scans each markdown cell, headings
included, for *measurement-like* numbers (``MEASUREMENT`` below):

* a percentage: ``7%``, ``0.5 %``;
* a decimal: ``0.942``, ``3.42``, also ``1e-3``, ``2.5·10⁻⁴``, ``10⁻⁶``;
* a ratio: ``6.2×``, ``4x`` (``4x faster``) -- but not a size: ``32×32``, ``8×8×4``, ``512 × 512``;
* a number after ``≈``, ``~``, ``about``, ``roughly``, ``around``, ``approximately``: ``≈ 370``, ``about 90``;
* a number with a unit: ``s sec ms µs min h seconds minutes hours MB GB kB KB MiB GiB dB px FLOP(s) GFLOP(s)
  TFLOP(s)``, and the counts ``k M B`` written against the number (``5.9M``, ``860M``; ``5.9 M`` for k, M).

Integers such as ``8 seeds``, ``16 images``, ``2-core``, ``step 3`` are never measurement-like. Not scanned:
math (``$...$``, ``$$...$$``), code spans and fenced blocks, URLs, link targets, HTML tags and comments, and
references (``REFERENCE`` below): ``notebook 06``, ``§3.2``, ``cell 12``, ``Exercise 2``, ``step 3``,
``(Eq. 12)``, ``Table 13``, ``Figure 2``, ``Algorithm 1``, ``section 4``, ``line 40``, ``block 3`` (and
``notebooks 04 and 05``), a heading's own number (``### 2.2 The trick``), versions (``v1.5``, ``SD 1.5``,
``Python 3.10``), ``arXiv:2112.10752``, years (``(2022)``, ``et al. 2023``, ``Ho et al., 2020``, ``Rombach
2022``), ``DPM-Solver++(2M)`` / ``DPM++ 2M``, and the level of an interval (``95% CI``, ``95% Wilson
interval``, ``95% confidence interval``).

Such a number is supported when an output of the same notebook printed it. The outputs' text -- ``stream``,
``text/plain``, ``text/markdown``, ``text/html`` without its tags; never an error -- is read for numbers
(``1,234``, ``−0.5`` with a unicode minus, ``1e-3``, ``2.5×10⁻⁴``, ``10⁻⁶``). A prose number ``v`` written with
``d`` decimals matches a printed ``x`` when ``|x − v| ≤ 0.5·10⁻ᵈ``, signs ignored (``7%`` matches ``7.05%``,
``354`` matches ``354`` but not ``355``; ``about 90`` needs 89.5 to 90.5 printed). A percentage also matches
``x·100`` (``0.0705`` for ``7%``); ``k M B`` also match the full count (``5.9M`` and ``5,912,345``); ``ms``
also matches seconds (``120 ms`` and ``0.12``), ``min`` also matches seconds (``2 min`` and ``118``).

A number that was not printed -- a fact from a paper or a setting of the design ("SD's U-Net has 860M
parameters") -- is exempted by an HTML comment after it on the same line that starts with ``source:``::

    Stable Diffusion's U-Net has 860M parameters. <!-- source: Rombach et al. 2022, Table 13 -->

which exempts every number on that line before it (numbers after it on the line are still checked); the
comment must open and close on that line. In a table, put it at the end of the row.
"""

from __future__ import annotations

import bisect
import io
import math
import re
import subprocess
import tokenize
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------------------------------------
# 1. Cited files
# ----------------------------------------------------------------------------------------------------------

SUFFIXES = ("md", "py", "ipynb", "json", "txt", "safetensors", "toml", "cfg")
BARE_NAME_SUFFIXES_CHECKED = (".md", ".py", ".ipynb")
TOP_LEVEL_FOLDERS = ("notebooks/", "sdlearn/", "benchmarks/", "tests/", "docs/", ".ci/")
DESIGN = re.compile(r"\bDESIGN(?:\.md)?\s*§|\bDESIGN\.md\b")
LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
PATH = re.compile(
    r"(?<![\w./~{}$*-])"  # not the middle of a longer name, a URL or a made-up path
    r"((?:\.{1,2}/)?[\w.*-]+(?:/[\w.*-]+)*\.(?:" + "|".join(SUFFIXES) + r"))"
    r"(?![\w/-])"
)
PLACEHOLDER = re.compile(r"(?:^|[_\-/])(?!(?:README|LICENSE|CHANGELOG|CONTRIBUTING|NOTES)\b)[A-Z][A-Z0-9]+(?=$|[_\-.*/])")
COURSE_NOTEBOOK_NAME = re.compile(r"\d\d_\w+\.ipynb")
URL = re.compile(r"\b(?:https?|ftp|file)://\S+|\bwww\.\S+")
NOT_A_LINK_TARGET = ("http:", "https:", "mailto:", "#", "ftp:", "file:", "attachment:", "data:")


@dataclass(frozen=True)
class MissingFile:
    """One citation of a file that is not in the repository."""

    where: str  # "notebooks/03_vae.ipynb, cell 12" or "sdlearn/data.py, line 40"
    cited: str  # the path as written
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: cites {self.cited!r}: {self.reason}"


def repository_files(root: Path = REPO_ROOT) -> set[str]:
    """The repository's files as POSIX paths relative to ``root``: git's index, or the working tree without git."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True, timeout=60)
        return {name for name in listed.stdout.decode().split("\0") if name}
    except (OSError, subprocess.SubprocessError):
        skip = {".git", ".venv", "runs", "__pycache__", ".ipynb_checkpoints"}
        return {
            path.relative_to(root).as_posix()
            for path in root.rglob("*")
            if path.is_file() and not skip.intersection(path.relative_to(root).parts)
        }


def _normalise(path: str) -> str | None:
    """``a/./b/../c`` -> ``a/c``; None when the path climbs out of its root."""
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                return None
            parts.pop()
        else:
            parts.append(part)
    return "/".join(parts)


def _is_citation(path: str) -> bool:
    if not path or path.startswith(("/", "~")) or "{" in path or "$" in path:
        return False
    first = path.split("/", 1)[0]
    if "/" in path and re.fullmatch(r"[A-Z][A-Z0-9_]*", first):  # FOLDER/captions.json, SD_PATH/unet/...
        return False
    return not (first == "runs" or path.startswith("./runs/"))


def _resolves(path: str, folder: str, root: Path, files: set[str]) -> bool:
    """Whether ``path`` names a repository file or folder, from the root or from ``folder`` (POSIX, relative)."""
    for base in ("", folder):
        joined = _normalise(f"{base}/{path}" if base else path)
        if joined is None:
            continue
        if "*" in joined:
            pattern = re.compile(re.escape(joined).replace(r"\*", r"[^/]*"))
            if any(pattern.fullmatch(name) for name in files) or any(root.glob(joined)):
                return True
        elif joined in files or any(name.startswith(f"{joined}/") for name in files) or (root / joined).exists():
            return True
    return False


def check_citation(path: str, folder: str, root: Path, files: set[str], link: bool = False) -> str | None:
    """Why ``path``, cited from a file in ``folder``, is not a repository file; None when it is (or is no citation).
    A markdown ``link`` target is always a citation; a path in prose only as the module docstring says."""
    path = path.split("#", 1)[0].split("?", 1)[0].rstrip(".,;:")
    if not _is_citation(path):
        return None
    if _resolves(path, folder, root, files):
        return None
    if link:
        return _missing(folder)
    if PLACEHOLDER.search(path):
        return None  # NN_*.ipynb, PATH.json, results/unet-YYYYMMDD-HHMM.txt: a pattern, not a file
    if "/" not in path.strip("/"):
        if any(name.rsplit("/", 1)[-1] == path for name in files):
            return None
        if not path.endswith(BARE_NAME_SUFFIXES_CHECKED):
            return None  # diffusers' model_index.json: a file of some other folder
    elif not path.startswith(("./", "../")) and not path.startswith(TOP_LEVEL_FOLDERS):
        first = path.split("/", 1)[0]
        folders = {f"{first}/"} | ({f"{folder}/{first}/"} if folder else set())
        on_disk = (root / first).is_dir() or (folder and (root / folder / first).is_dir())
        if not (on_disk or any(name.startswith(tuple(folders)) for name in files)):
            return None  # out_dir/vae.safetensors, unet/config.json: a path in some other folder
    return _missing(folder)


def _missing(folder: str) -> str:
    return "no such file in the repository (looked from the root" + (f" and from {folder}/)" if folder else ")")


DESIGN_REASON = "DESIGN.md is not in the repository: cite the README, a module or a paper instead"
LINK_TARGET = "link"


def citations_in_prose(text: str) -> list[tuple[str, str | None]]:
    """``(cited, reason)`` for prose (markdown, a comment, a docstring): reason is DESIGN_REASON for a DESIGN
    citation, LINK_TARGET for a link's target, None for a path in the text."""
    found: list[tuple[str, str | None]] = []
    for match in DESIGN.finditer(text):
        found.append((match.group().strip(), DESIGN_REASON))
    without_comments = re.sub(r"<!--.*?-->", " ", text, flags=re.S)
    for match in LINK.finditer(without_comments):
        target = match.group(1)
        if not target.lower().startswith(NOT_A_LINK_TARGET):
            found.append((target, LINK_TARGET))
    prose = URL.sub(" ", LINK.sub(" ", without_comments))
    found.extend((match.group(1), None) for match in PATH.finditer(prose) if not DESIGN.match(match.group(1)))
    return found


def _python_pieces(source: str) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """``(prose, strings)`` of Python source, each as ``(line, text)``: prose = comments and docstrings, strings = the
    other string literals' values. IPython magics (``%``, ``!`` lines) are blanked first."""
    lines = ["" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines()]
    clean = "\n".join(lines) + "\n"
    prose: list[tuple[int, str]] = []
    strings: list[tuple[int, str]] = []
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(clean).readline))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        for number, line in enumerate(lines, start=1):
            if "#" in line:
                prose.append((number, line[line.index("#") :]))
        return prose, strings
    statement_start = True
    for token in tokens:
        if token.type == tokenize.COMMENT:
            prose.append((token.start[0], token.string))
            continue
        if token.type == tokenize.NL:
            continue
        if token.type in (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            statement_start = True
            continue
        if token.type == tokenize.STRING:
            value = re.sub(r"^[rRbBuUfF]*('\'\'|\"\"\"|'|\")", "", token.string)
            value = re.sub(r"('\'\'|\"\"\"|'|\")$", "", value)
            (prose if statement_start else strings).append((token.start[0], value))
        statement_start = False
    return prose, strings


def _code_citations(source: str) -> list[tuple[int, str, str | None]]:
    """``(line, cited, reason)`` in Python source: the citations in comments and docstrings (a bare file name only
    when it is a course notebook's, ``NN_name.ipynb``: ``# writes my_copy.ipynb`` is made at run time), and the
    other string literals that start with a top-level folder of the repository."""
    prose, strings = _python_pieces(source)
    found = [
        (line, cited, reason)
        for line, text in prose
        for cited, reason in citations_in_prose(text)
        if reason is not None or "/" in cited or COURSE_NOTEBOOK_NAME.fullmatch(cited)
    ]
    for line, value in strings:
        value = value.strip()
        if value.startswith(TOP_LEVEL_FOLDERS) and re.fullmatch(r"[\w./*-]+", value):
            found.append((line, value, None))
    return found


def _cell_source(cell: Mapping) -> str:
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else source


def cited_missing_files(
    nb: Mapping | None = None,
    *,
    notebook_path: str = "notebooks/notebook.ipynb",
    python_source: str | None = None,
    python_path: str = "sdlearn/module.py",
    root: Path = REPO_ROOT,
    files: set[str] | None = None,
) -> list[MissingFile]:
    """Every citation, in notebook ``nb`` (markdown and code cells) or in ``python_source`` (docstrings, comments,
    path-like strings), of a file that is not in the repository at ``root``. Paths are POSIX, relative to ``root``."""
    files = repository_files(root) if files is None else files
    missing: list[MissingFile] = []

    def add(where: str, folder: str, cited: str, reason: str | None) -> None:
        if reason != DESIGN_REASON:
            reason = check_citation(cited, folder, root, files, link=reason == LINK_TARGET)
        if reason:
            missing.append(MissingFile(where, cited, reason))

    if nb is not None:
        folder = notebook_path.rsplit("/", 1)[0] if "/" in notebook_path else ""
        for index, cell in enumerate(nb["cells"]):
            source = _cell_source(cell)
            if cell["cell_type"] == "markdown":
                for cited, reason in citations_in_prose(source):
                    add(f"{notebook_path}, cell {index}", folder, cited, reason)
            elif cell["cell_type"] == "code":
                for line, cited, reason in _code_citations(source):
                    add(f"{notebook_path}, cell {index} line {line}", folder, cited, reason)
    if python_source is not None:
        folder = python_path.rsplit("/", 1)[0] if "/" in python_path else ""
        for line, cited, reason in _code_citations(python_source):
            add(f"{python_path}, line {line}", folder, cited, reason)
    return missing


# ----------------------------------------------------------------------------------------------------------
# 2. Quoted numbers
# ----------------------------------------------------------------------------------------------------------

SUPERSCRIPT = str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹⁻⁺", "0123456789-+")
_SUP = "[⁻⁺]?[⁰¹²³⁴⁵⁶⁷⁸⁹]+"
# A number as written: 1,234.5 | 0.942 | 1e-3 | 2.5·10⁻⁴ | 2.5 × 10⁻⁴ | 10⁻⁶ (a sign is never part of it)
NUMBER = (
    r"(?:(?P<mantissa>\d+(?:\.\d+)?)\s*[·×x*]\s*)?10(?P<power>" + _SUP + r")"
    r"|(?P<plain>(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)(?:[eE](?P<exp>[-+−]?\d+))?"
)
UNITS = r"ms|µs|min|seconds?|minutes?|hours?|sec|s|h|MB|GB|kB|KB|MiB|GiB|dB|px|[GT]FLOPs?|FLOPs?"
COUNT_MULTIPLIER = {"k": 1e3, "M": 1e6, "B": 1e9}
MEASUREMENT = re.compile(
    r"(?P<about>(?:≈|~|\b(?i:about|roughly|around|approximately|approx\.)\s)\s*)?"
    r"(?<![\w.,])(?P<number>" + NUMBER + r")"
    r"(?:(?P<percent>\s?%)"
    r"|(?P<ratio>\s?×(?!\s*\d)|x(?![\w\d]|\s*\d))"
    r"|\s?(?P<unit>" + UNITS + r")(?![\w/])"
    r"|(?P<count>[kM]\b|B(?![\w/])|\s[kM](?![\w/]))"
    r")?"
    r"(?![\w.]\d)",
)
# Numbers that are references, not quantities: removed from the prose before MEASUREMENT runs.
REFERENCE = re.compile(
    r"(?i:\b(?:notebooks?|cells?|exercises?|steps?|eqs?\.?|equations?|tables?|figures?|figs?\.?|algorithms?"
    r"|appendix|sections?|chapters?|parts?|lines?|items?|issues?|layers?|blocks?)\s*\(?"
    r"\d+(?:\.\d+)*(?:[a-z])?\)?(?:\s*(?:[-–,]|and|to)\s*\d+(?![\d.,%×\w]))*)"
    r"|§\s*\d+(?:\.\d+)*"
    r"|\bv\d+(?:\.\d+)+"
    r"|\b(?:SD|SDXL|Stable Diffusion|Python|PyTorch|torch|diffusers|CLIP|version|release)\s+v?\d+(?:\.\d+)+"
    r"|(?i:arXiv):?\s*\d{4}\.\d{4,5}"
    r"|\bet al\.?,?\s*(?:19|20)\d\d[a-z]?|\((?:19|20)\d\d[a-z]?\)|\b[A-Z][\w-]*,?\s+(?:19|20)\d\d\b"
    r"|DPM(?:-Solver)?\+\+\s*\(?\d[MS]\)?"
    r"|\d+(?:\.\d+)?\s?%\s+(?:CI\b|(?:\(?Wilson\)?\s+|confidence\s+)+intervals?)"
)
HEADING_NUMBER = re.compile(r"^(#{1,6}\s+)\d+(?:\.\d+)*\.?(?=\s)", re.M)
SOURCE_COMMENT = re.compile(r"<!--\s*source:.*?-->", re.I | re.S)


@dataclass(frozen=True)
class Quoted:
    """A number the prose quotes: the values it may have been printed as, each with its tolerance."""

    text: str
    candidates: tuple[tuple[float, float], ...]

    def printed_by(self, printed: list[float]) -> bool:
        """Whether a number of ``printed`` (sorted, non-negative) lies within a candidate's tolerance."""
        for value, tolerance in self.candidates:
            at = bisect.bisect_left(printed, value - tolerance * (1 + 1e-9))
            if at < len(printed) and printed[at] <= value + tolerance * (1 + 1e-9):
                return True
        return False


def _value_and_tolerance(match: re.Match) -> tuple[float, float]:
    """The number written in ``match`` (a NUMBER match) and half a unit of its last written digit."""
    if match.group("power") is not None:
        power = int(match.group("power").translate(SUPERSCRIPT))
        mantissa_text = match.group("mantissa") or "1"
        decimals = len(mantissa_text.split(".")[1]) if "." in mantissa_text else 0
        return float(mantissa_text) * 10.0**power, 0.5 * 10.0 ** (power - decimals)
    text = match.group("plain").replace(",", "")
    exponent = int(match.group("exp").replace("−", "-")) if match.group("exp") else 0
    decimals = len(text.split(".")[1]) if "." in text else 0
    return float(text) * 10.0**exponent, 0.5 * 10.0 ** (exponent - decimals)


NUMBER_ONLY = re.compile(r"(?<![\w.])(?:" + NUMBER + r")")


def printed_numbers(text: str) -> list[float]:
    """Every number in printed text, sorted (``1,234`` read both as 1234 and as 1 and 234; signs dropped)."""
    text = text.translate(str.maketrans({"−": "-", "\u2009": " ", "\u202f": " "}))
    values: list[float] = []
    for pattern in (NUMBER_ONLY, re.compile(r"(?<![\d.])\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")):
        for match in pattern.finditer(text):
            if match.re is NUMBER_ONLY:
                values.append(_value_and_tolerance(match)[0])
            else:
                values.append(float(match.group()))
    return sorted(abs(v) for v in values if math.isfinite(v))


def _quoted(match: re.Match) -> Quoted | None:
    """The Quoted for a MEASUREMENT match, or None when the number is not measurement-like."""
    value, tolerance = _value_and_tolerance(match)
    number_text = match.group("number")
    decimal = "." in number_text or match.group("power") is not None or match.group("exp") is not None
    kind = next((k for k in ("percent", "ratio", "unit", "count") if match.group(k)), None)
    if not (decimal or kind or match.group("about")):
        return None
    candidates = [(value, tolerance)]
    if kind == "percent":
        candidates.append((value / 100, tolerance / 100))
    elif kind == "count":
        scale = COUNT_MULTIPLIER[match.group("count").strip()]
        candidates.append((value * scale, tolerance * scale))
    elif kind == "unit" and match.group("unit") == "ms":
        candidates.append((value / 1000, tolerance / 1000))
    elif kind == "unit" and match.group("unit") == "min":
        candidates.append((value * 60, tolerance * 60))
    return Quoted(" ".join(match.group().split()), tuple(candidates))


def _blank(text: str, pattern: re.Pattern | str, flags: int = 0) -> str:
    """Replace each match of ``pattern`` by as many spaces (newlines kept), so positions and lines stay."""
    return re.sub(pattern, lambda m: re.sub(r"[^\n]", " ", m.group()), text, flags=flags)


def prose_of_markdown(source: str) -> str:
    """The markdown with everything that is not checked prose blanked out (see the module docstring)."""
    lines = []
    for line in source.split("\n"):
        exempt = list(SOURCE_COMMENT.finditer(line))
        if exempt:
            line = " " * exempt[-1].end() + line[exempt[-1].end() :]
        lines.append(line)
    text = "\n".join(lines)
    text = _blank(text, r"<!--.*?-->", re.S)
    text = _blank(text, r"^(```|~~~).*?^\1[^\n]*$", re.S | re.M)
    text = _blank(text, r"(`+).+?\1", re.S)
    text = _blank(text, r"(?<!\\)\$\$.+?(?<!\\)\$\$", re.S)
    text = _blank(text, r"(?<![\\$])\$(?!\$).+?(?<![\\$])\$", re.S)
    text = _blank(text, r"\\\(.+?\\\)|\\\[.+?\\\]", re.S)
    text = re.sub(r"(!?\[[^\]\n]*\])\([^)\n]*\)", lambda m: m.group(1) + " " * (len(m.group()) - len(m.group(1))), text)
    text = _blank(text, URL)
    text = _blank(text, r"</?[A-Za-z][^>\n]*>")
    text = _blank(text, HEADING_NUMBER)
    return _blank(text, REFERENCE)


def quoted_numbers(source: str) -> list[tuple[Quoted, str]]:
    """Every measurement-like number in a markdown cell, with 60 characters of its context."""
    prose = prose_of_markdown(source)
    flat = re.sub(r"\s+", " ", source.replace("\n", " "))
    found = []
    for match in MEASUREMENT.finditer(prose):
        quoted = _quoted(match)
        if quoted is None:
            continue
        start = len(re.sub(r"\s+", " ", source[: match.start()].replace("\n", " ")))
        context = flat[max(0, start - 25) : start + 35].strip()
        found.append((quoted, context))
    return found


def output_text(nb: Mapping) -> str:
    """The text of every output of ``nb`` that a reader sees, errors excluded, one output per line."""
    pieces = []
    for cell in nb["cells"]:
        for output in cell.get("outputs", []) if cell["cell_type"] == "code" else []:
            if output.get("output_type") == "stream":
                pieces.append(_joined(output.get("text", "")))
            elif output.get("output_type") in ("execute_result", "display_data"):
                data = output.get("data", {})
                for mime in ("text/plain", "text/markdown"):
                    if mime in data:
                        pieces.append(_joined(data[mime]))
                if "text/html" in data:
                    pieces.append(re.sub(r"<[^>]*>", " ", _joined(data["text/html"])))
    return "\n".join(pieces)


def _joined(text: str | list[str]) -> str:
    return "".join(text) if isinstance(text, list) else text


def unsupported_numbers(nb: Mapping) -> list[tuple[int, str, str]]:
    """``(cell_index, number_text, context)`` for every measurement-like number in a markdown cell of ``nb`` that no
    output of ``nb`` printed and no ``<!-- source: ... -->`` comment exempts."""
    printed = printed_numbers(output_text(nb))
    unsupported = []
    for index, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "markdown":
            continue
        for quoted, context in quoted_numbers(_cell_source(cell)):
            if not quoted.printed_by(printed):
                unsupported.append((index, quoted.text, context))
    return unsupported
