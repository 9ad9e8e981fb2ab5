# Two entry points for a fresh machine with only python3 and pip:
#   make demo   - create .venv, install, unlearn on the embedded default
#   make test   - create .venv, install, run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test bench clean

$(STAMP): pyproject.toml constraints/cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints/cpu.txt -e '.[dev,triton,hf]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) launch/unlearn.py

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) -m pytest -q benchmarks --benchmark-enable --benchmark-json=benchmarks/results/latest-cpu.json

clean:
	rm -rf $(VENV) runs .cache
