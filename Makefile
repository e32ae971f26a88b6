# evaclip: `make demo` runs the main job, `make test` runs the tests; each creates .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PIP := $(VENV)/bin/pip
EVACLIP := $(VENV)/bin/evaclip

.PHONY: demo test test-fast check venv completions clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

# the whole lifecycle on the embedded demo data (evaclip demo): a tiny CLIP (teacher) -> MIM distillation into a
# wider, deeper student -> the student's CLIP -> video stage -> convert -> eval suite -> push --dry-run
demo: venv
	rm -rf runs/demo
	$(EVACLIP) demo --out runs/demo

# the static checks: the layer contract (imports go down, no cycles), lint + import order, types of the package
check: venv
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check evaclip_cli tests bench
	$(VENV)/bin/mypy

# everything CI runs (.ci/run)
test: check
	$(VENV)/bin/python -m pytest -q -n 2 tests

# the quick loop while editing: the static checks and every test not marked slow
test-fast: check
	$(VENV)/bin/python -m pytest -q -n 2 -m "not slow" tests

completions: venv
	$(VENV)/bin/python -m evaclip_cli.cli.completions write completions

clean:
	rm -rf $(VENV) runs demo_data
