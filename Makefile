# evaclip: `make demo` runs the main job, `make test` runs the tests; each creates .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PIP := $(VENV)/bin/pip
EVACLIP := $(VENV)/bin/evaclip
export DS_ACCELERATOR ?= cpu
export DS_BUILD_OPS ?= 0

.PHONY: demo test venv completions clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(EVACLIP) estimate --recipe 18b

test: venv
	$(VENV)/bin/python -m pytest -q tests

completions: venv
	$(VENV)/bin/python -m evaclip_cli.completions write completions

clean:
	rm -rf $(VENV) runs demo_data
