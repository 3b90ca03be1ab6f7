"""The course's review, automated (issue 18, item 5): notebooks cite only files in the repository, and every
measurement-like number a markdown cell quotes was printed by the notebook. The convention is documented in
tests/notebook_review.py; the first tests below check each mechanism on small made-up notebooks."""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from notebook_review import (  # noqa: E402
    REPO_ROOT,
    cited_missing_files,
    printed_numbers,
    repository_files,
    unsupported_numbers,
)

COURSE_NOTEBOOKS = sorted(REPO_ROOT.glob("notebooks/[0-9][0-9]_*.ipynb"))
FILES = {"README.md", "notebooks/01_a.ipynb", "notebooks/notation.md", "sdlearn/weights/README.md",
         "sdlearn/weights/unet.safetensors", "benchmarks/quality.py", "benchmarks/results/run-1.txt"}


def notebook(*cells) -> nbformat.NotebookNode:
    """A notebook from ("md", text) and ("code", source, printed text) tuples."""
    nb = nbformat.v4.new_notebook()
    for cell in cells:
        if cell[0] == "md":
            nb.cells.append(nbformat.v4.new_markdown_cell(cell[1]))
        else:
            code = nbformat.v4.new_code_cell(cell[1])
            if len(cell) > 2:
                code.outputs = [nbformat.v4.new_output("stream", name="stdout", text=cell[2])]
            nb.cells.append(code)
    return nb


def missing(nb=None, **kwargs) -> list[str]:
    return [m.cited for m in cited_missing_files(nb, notebook_path="notebooks/01_a.ipynb", root=Path("/nonexistent"),
                                                 files=FILES, **kwargs)]


def numbers(*cells) -> list[str]:
    return [text for _, text, _ in unsupported_numbers(notebook(*cells))]


# ---------------------------------------------------------------------------------------------------------
# Cited files


def test_a_citation_of_a_file_in_the_repository_passes():
    nb = notebook(("md", "See [the notation](notation.md), `sdlearn/weights/README.md`, benchmarks/quality.py, "
                         "[the README](../README.md), `unet.safetensors` and `benchmarks/results/run-*.txt`."))
    assert missing(nb) == []


def test_a_citation_of_a_missing_file_fails_with_its_cell_and_path():
    nb = notebook(("md", "Intro."), ("md", "As `benchmarks/speed.py` shows, and [this](notes/extra.md)."))
    found = cited_missing_files(nb, notebook_path="notebooks/01_a.ipynb", root=Path("/nonexistent"), files=FILES)
    assert [(m.where, m.cited) for m in found] == [("notebooks/01_a.ipynb, cell 1", "notes/extra.md"),
                                                   ("notebooks/01_a.ipynb, cell 1", "benchmarks/speed.py")]
    assert "cell 1" in str(found[0]) and "notes/extra.md" in str(found[0])


def test_design_is_never_a_valid_citation():
    found = cited_missing_files(notebook(("md", "The layers (DESIGN §2) and DESIGN.md.")),
                                root=Path("/nonexistent"), files=FILES | {"DESIGN.md"})
    assert len(found) == 2 and all("cite the README, a module or a paper" in m.reason for m in found)


def test_urls_anchors_modules_and_run_time_names_are_not_citations():
    nb = notebook(("md", "[paper](https://arxiv.org/abs/2112.10752), [above](#goals), `sdlearn.data`, "
                         "`runs/exp/loss.json`, `~/scratch/x.json`, `FOLDER/captions.json`, `model_index.json`, "
                         "an SD folder's `unet/config.json`, `NN_*.ipynb`"),
                  ("code", 'out = "runs/x"\npath = f"{out}/x.json"\ncopy = "my_copy.ipynb"\nopen("~/scratch/a.txt")'))
    assert missing(nb) == []


def test_code_cells_count_comments_and_repository_path_strings_only():
    nb = notebook(("code", '# see benchmarks/gone.py, then 02_b.ipynb; writes my_copy.ipynb\n'
                           'RESULTS = "benchmarks/results/old.txt"\nname = "scratch.json"'))
    assert missing(nb) == ["benchmarks/gone.py", "02_b.ipynb", "benchmarks/results/old.txt"]


def test_a_bare_notebook_name_must_exist():
    assert missing(notebook(("md", "Next: `01_a.ipynb`, then `02_b.ipynb`."))) == ["02_b.ipynb"]


def test_docstrings_and_comments_of_a_module_are_checked():
    source = '"""Layers as in DESIGN.md; see `sdlearn/weights/README.md`."""\n\nX = 1  # sdlearn/gone.py\n'
    found = cited_missing_files(python_source=source, python_path="sdlearn/x.py", root=Path("/nonexistent"),
                                files=FILES)
    assert [(m.where, m.cited) for m in found] == [("sdlearn/x.py, line 1", "DESIGN.md"),
                                                   ("sdlearn/x.py, line 3", "sdlearn/gone.py")]


# ---------------------------------------------------------------------------------------------------------
# Quoted numbers


def test_a_printed_number_passes_and_an_unprinted_one_fails():
    assert numbers(("code", "", "accuracy 0.942\n"), ("md", "It reaches 0.942.")) == []
    assert numbers(("code", "", "accuracy 0.942\n"), ("md", "It reaches 0.951.")) == ["0.951"]


def test_the_prose_may_round_what_was_printed():
    printed = ("code", "", "leak: 7.05%  steps: 354  ratio 6.17\n")
    assert numbers(printed, ("md", "A 7% leak after ≈ 354 steps, 6.2× the base.")) == []
    assert numbers(printed, ("md", "A 7.2% leak after ≈ 355 steps, 6.1× the base.")) == ["7.2%", "≈ 355", "6.1×"]


def test_a_percentage_matches_a_printed_fraction():
    assert numbers(("code", "", "0.0705\n"), ("md", "About 7% is left.")) == []
    assert numbers(("code", "", "0.0805\n"), ("md", "About 7% is left.")) == ["About 7%"]


def test_units_counts_and_printed_forms():
    printed = ("code", "", "params 5,912,345\nstep 0.12 s\nbeta −1e-3\nPSNR 33.46\nsigma 2.5×10⁻⁴\n")
    prose = "It has 5.9M parameters; a step takes 120 ms; β is 1e-3 and σ 2.5·10⁻⁴; PSNR 33.5 dB."
    assert numbers(printed, ("md", prose)) == []
    assert numbers(("code", "", "nothing\n"), ("md", prose)) == ["5.9M", "120 ms", "1e-3", "2.5·10⁻⁴", "33.5 dB"]


def test_a_source_comment_exempts_the_numbers_before_it_on_its_line():
    cell = ("md", "SD's U-Net has 860M parameters. <!-- source: Rombach et al. 2022, Table 13 --> It uses 0.5.\n"
                  "Its VAE has 84M.")
    assert numbers(cell) == ["0.5", "84M"]


def test_counts_sizes_and_references_are_not_measurements():
    cell = ("md", "## 2.2 Training\n32×32 images, an 8×8×4 latent, 8 seeds, 16 images, a 2-core laptop; "
                  "notebook 06, §3.2, cell 12, Exercise 2, step 3, (Eq. 12), Table 13, SD v1.5, Stable Diffusion "
                  "1.5, arXiv:2112.10752, (Ho et al., 2020), DPM-Solver++(2M), with 95% Wilson intervals.\n"
                  "Math is skipped: $\\beta = 0.02$, $$x = 0.5$$, `lr=1e-4`, [link](https://x.org/0.5).")
    assert numbers(cell) == []
    assert numbers(("md", "In Exercise 2, 0.942; by step 3, 14%; notebooks 04 and 05.")) == ["0.942", "14%"]


def test_headings_and_failures_say_where_and_in_what_context():
    found = unsupported_numbers(notebook(("code", "", "1\n"), ("md", "# Results: 93.1% right\nMore text.")))
    assert [(index, text) for index, text, _ in found] == [(1, "93.1%")]
    assert "Results: 93.1% right" in found[0][2]


def test_error_outputs_do_not_support_a_number():
    nb = notebook(("code", ""), ("md", "It printed 0.75."))
    nb.cells[0].outputs = [nbformat.v4.new_output("error", ename="ValueError", evalue="0.75", traceback=["0.75"])]
    assert [text for _, text, _ in unsupported_numbers(nb)] == ["0.75"]


def test_printed_numbers_reads_separators_minus_and_exponents():
    values = printed_numbers("1,234 −0.5 1e-3 10⁻⁶ tensor([0.25])")
    for expected in (1234, 0.5, 1e-3, 1e-6, 0.25):
        assert any(abs(v - expected) < 1e-12 for v in values), expected


# ---------------------------------------------------------------------------------------------------------
# The course


def _where(number_list):
    return "\n".join(f"  cell {index}: {text!r} in ...{context}..." for index, text, context in number_list)


@pytest.mark.parametrize("path", COURSE_NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_cites_only_files_in_the_repository(path):
    nb = nbformat.read(path, as_version=4)
    found = cited_missing_files(nb, notebook_path=path.relative_to(REPO_ROOT).as_posix())
    assert not found, "cites files that are not in the repository:\n" + "\n".join(f"  {m}" for m in found)


@pytest.mark.parametrize("path", COURSE_NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_prose_numbers_were_printed(path):
    found = unsupported_numbers(nbformat.read(path, as_version=4))
    assert not found, (
        f"{path.name}: {len(found)} number(s) in the prose that no output printed; print each, or follow it with "
        f"<!-- source: ... --> on its line when it is not a result (tests/notebook_review.py):\n{_where(found)}"
    )


def test_docstrings_cite_only_files_in_the_repository():
    files = repository_files()
    found = [m for path in sorted((REPO_ROOT / "sdlearn").rglob("*.py"))
             for m in cited_missing_files(python_source=path.read_text(), files=files,
                                          python_path=path.relative_to(REPO_ROOT).as_posix())]
    assert not found, "sdlearn cites files that are not in the repository:\n" + "\n".join(f"  {m}" for m in found)
