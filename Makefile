# The two commands of the README's quick start, each setting itself up on first use:
#   make lab    open the course in JupyterLab (make notebook: in Jupyter Notebook 7)
#   make test   run the unit tests and re-execute every notebook under nbval; with Chromium
#               installed (apt-get install chromium), the browser tests of tests/browser too
# Both create ./.venv and install sdlearn into it when it is missing or pyproject.toml changed.

PYTHON      ?= python3
VENV        ?= .venv
# A CPU-only torch: a few hundred MB instead of several GB of CUDA wheels.
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
BIN         := $(VENV)/bin
STAMP       := $(VENV)/.sdlearn-installed

.PHONY: lab notebook test test-fast test-browser lint notebooks student clean-venv

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c "import torch" 2>/dev/null || \
		$(BIN)/python -m pip install "$(TORCH_SPEC)" --extra-index-url $(TORCH_INDEX)
	$(BIN)/python -m pip install -e ".[dev]"
	@touch $(STAMP)

# JupyterLab refuses to run as root unless told; containers often are root.
LAB_ARGS ?= $(if $(filter 0,$(shell id -u)),--allow-root,)

lab: $(STAMP)
	$(BIN)/jupyter lab $(LAB_ARGS) notebooks/

notebook: $(STAMP)
	$(BIN)/jupyter notebook $(LAB_ARGS) notebooks/

# Two workers (pytest-xdist) by default: while one waits on a kernel or the browser, the other computes.
# --dist loadfile keeps each file in one worker: a notebook's cells share one kernel, in order, under nbval.
# TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

# The explorers in JupyterLab in headless Chromium (Debian's: apt-get install chromium; SDLEARN_CHROMIUM=PATH
# for another). Fails, rather than skips, without Chromium. Failure screenshots land in test-artifacts/.
test-browser: $(STAMP)
	SDLEARN_REQUIRE_BROWSER=1 $(BIN)/python -m pytest tests/browser

# The unit tests alone, for the edit-test loop: no notebook is executed (no nbval, no student copies, no
# browser), and the tests marked slow (several processes, real training runs, Jupyter kernels, large sweeps;
# pyproject.toml) are left out. `make test` runs them all.
test-fast: $(STAMP)
	$(BIN)/python -m pytest tests --ignore=tests/browser --ignore=tests/test_student_copies.py -m "not slow" \
		$(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

lint: $(STAMP)
	$(BIN)/ruff check .

# Re-execute every notebook in place (after a change to sdlearn), then `make test`. No widget state is kept
# (an earlier run's is dropped first), so that viewers without a kernel show each explorer's picture (see
# sdlearn/widgets.py).
COURSE_NOTEBOOKS = notebooks/[0-9][0-9]_*.ipynb
notebooks: $(STAMP)
	$(BIN)/python -c 'import sys, nbformat; [nbformat.write(nb, path) for path in sys.argv[1:] \
		for nb in [nbformat.read(path, as_version=4)] if nb.metadata.pop("widgets", None) is not None]' \
		$(COURSE_NOTEBOOKS)
	$(BIN)/jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.store_widget_state=False \
		$(COURSE_NOTEBOOKS)

# Student copies without solutions: make student OUT=student
OUT ?= student
student: $(STAMP)
	$(BIN)/python -m sdlearn exercises $(OUT)

clean-venv:
	rm -rf $(VENV)
