# Two entry points for a fresh machine with only python3 and pip:
#   make demo   - create .venv, install, unlearn on the embedded default
#   make test   - create .venv, install, run the test suite
# The GPU validation kit (benchmarks/README.md, "GPU validation kit"):
#   make gpu-wheels                - here, with PyPI: .whl/ holds every wheel the GPU image lacks
#   make gpu-check                 - on the offline GPU machine: install .whl/, run the parts
#   GPU_CHECK_DRY=1 make gpu-check - the same parts on CPU at tiny sizes (tests/test_gpu_check.py)
#   make gpu-rehearsal             - that dry run here with the GPU image's torch, torchvision and Triton
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

# The GPU image's own python3 (torch 2.11, triton 3.6); never this machine's .venv.
GPU_PYTHON ?= python3
# The GPU image's Triton (constraints/gpu.txt) beside the venv's: tests/test_triton_tiles.py
# compiles the shipped tiles with it too, since that is the version that will run them.
GPU_TRITON_VERSION := $(shell sed -n 's/^triton==//p' constraints/gpu.txt)
GPU_TRITON := .cache/triton-$(GPU_TRITON_VERSION)

# What the dry run needs first (tests/test_gpu_check.py, already inside the venv, sets it empty).
GPU_CHECK_DEPS ?= $(STAMP)

.PHONY: demo test bench clean gpu-wheels gpu-check gpu-triton gpu-rehearsal

$(STAMP): pyproject.toml constraints/cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints/cpu.txt -e '.[dev,triton,hf]'
	touch $(STAMP)

$(GPU_TRITON)/.stamp: constraints/gpu.txt $(STAMP)
	rm -rf $(GPU_TRITON)
	$(PY) -m pip install -q --no-deps --target $(GPU_TRITON) triton==$(GPU_TRITON_VERSION)
	touch $@

gpu-triton: $(GPU_TRITON)/.stamp

# The image's versions (benchmarks/gpu/wheels.py IMAGE) installed beside the venv, first on
# PYTHONPATH; the venv's CUDA 13 libraries serve that torch build too. ~1.6 GB, not in `make test`.
# The image's numpy 2.5 needs CPython 3.12 and stays the venv's.
GPU_IMAGE := .cache/gpu-image
GPU_IMAGE_PINS = $$($(PY) -c "from benchmarks.gpu.wheels import IMAGE; print(*(f'{n}=={IMAGE[n]}' for n in ('torch', 'torchvision', 'triton')))")
$(GPU_IMAGE)/.stamp: benchmarks/gpu/wheels.py $(STAMP)
	rm -rf $(GPU_IMAGE)
	$(PY) -m pip install -q --no-deps --target $(GPU_IMAGE) $(GPU_IMAGE_PINS)
	touch $@

gpu-rehearsal: $(GPU_IMAGE)/.stamp
	PYTHONPATH=$(abspath $(GPU_IMAGE)) TORCH_EXTENSIONS_DIR=$(abspath $(GPU_IMAGE))/torch_extensions \
		$(PY) benchmarks/gpu_check.py --dry --out $(GPU_IMAGE)/out $(GPU_CHECK_ARGS)

demo: $(STAMP)
	$(PY) launch/unlearn.py

# The slowest tests are listed at the end, so a CI log shows where the suite's time goes.
test: $(STAMP) $(GPU_TRITON)/.stamp
	$(PY) -m pytest -q --durations=15 tests

bench: $(STAMP)
	$(PY) -m pytest -q benchmarks --benchmark-enable --benchmark-json=benchmarks/results/latest-cpu.json

gpu-wheels: $(STAMP)
	$(PY) -m benchmarks.gpu.wheels build

ifeq ($(GPU_CHECK_DRY),1)
gpu-check: $(GPU_CHECK_DEPS)
	$(PY) benchmarks/gpu_check.py --dry $(GPU_CHECK_ARGS)
else
gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)
endif

clean:
	rm -rf $(VENV) runs .cache
