# evaclip: `make demo` runs the main job, `make test` runs the tests; each creates .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PIP := $(VENV)/bin/pip
EVACLIP := $(VENV)/bin/evaclip

.PHONY: demo test venv completions clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	rm -rf runs/tiny
	$(EVACLIP) train --recipe tiny --out runs/tiny

test: venv
	$(VENV)/bin/python -m pytest -q tests

completions: venv
	$(VENV)/bin/python -m evaclip_cli.completions write completions

clean:
	rm -rf $(VENV) runs demo_data
