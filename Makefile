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

# the weak-to-strong chain on the embedded demo data: a tiny CLIP (teacher) -> MIM distillation into a wider,
# deeper student -> the student's CLIP; each step prints its zero-shot accuracy / loss
demo: venv
	rm -rf runs/demo
	$(EVACLIP) train --recipe tiny --out runs/demo/teacher
	$(EVACLIP) distill --recipe distill-tiny --out runs/demo/student
	$(EVACLIP) train --recipe tiny-student --out runs/demo/clip

test: venv
	$(VENV)/bin/python -m pytest -q tests

completions: venv
	$(VENV)/bin/python -m evaclip_cli.completions write completions

clean:
	rm -rf $(VENV) runs demo_data
