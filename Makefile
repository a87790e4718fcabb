# The two commands of the README. Everything they need is installed by `make`, into .venv/.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test lint

demo: $(STAMP)
	$(VENV)/bin/trace-processor demo

test: $(STAMP)
	$(VENV)/bin/ruff check processor tests
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest -p no:cacheprovider -p no:phoenix -ra

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet uv
	$(VENV)/bin/uv pip install --quiet --python $(VENV)/bin/python -e ".[stack,test,agents,examples]"
	touch $(STAMP)
