# The two commands of the README's quick start, each setting itself up on first use:
#   make lab    open the course in JupyterLab
#   make test   run the unit tests and re-execute every notebook under nbval
# Both create ./.venv and install sdlearn into it when it is missing or pyproject.toml changed.

PYTHON      ?= python3
VENV        ?= .venv
# A CPU-only torch: a few hundred MB instead of several GB of CUDA wheels.
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
BIN         := $(VENV)/bin
STAMP       := $(VENV)/.sdlearn-installed

.PHONY: lab test lint notebooks student clean-venv

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

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .

# Re-execute every notebook in place (after a change to sdlearn), then `make test`.
notebooks: $(STAMP)
	$(BIN)/jupyter nbconvert --to notebook --execute --inplace notebooks/[0-9][0-9]_*.ipynb

# Student copies without solutions: make student OUT=student
OUT ?= student
student: $(STAMP)
	$(BIN)/python -m sdlearn exercises $(OUT)

clean-venv:
	rm -rf $(VENV)
