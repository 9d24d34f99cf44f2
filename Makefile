# The README's commands. Everything runs from the virtual environment at .venv (created on first use,
# reused while requirements.txt is unchanged). `make demo` = the main job, `make test` = every check.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
DEPS := $(VENV)/.deps-installed
JOBS ?= 2

.PHONY: all venv build demo info readiness test test-cpp test-py test-fast compat clean

all: build

$(DEPS): requirements.txt
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet -r requirements.txt
	WAN_NO_EXT=1 $(VPY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $(DEPS)

venv: $(DEPS)

# Incremental (ninja) build of wan_kernels._C in place, C++ CPU + CUDA for WAN_CUDA_ARCHS.
build: $(DEPS)
	WAN_BUILD_JOBS=$(JOBS) $(VPY) setup.py --quiet build_ext --inplace

demo: build
	$(VPY) -m wan_model demo

info: build
	$(VPY) -m wan_kernels

NVCC := $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)

# Torch-free host code + its unit tests; with nvcc, the same numerics also compiled as device code.
# The CUTLASS host test needs the nvidia-cutlass headers from the venv.
test-cpp: $(DEPS)
	cmake -S . -B build/cmake -G Ninja -DCMAKE_BUILD_TYPE=Release > /dev/null
	cmake --build build/cmake
	ctest --test-dir build/cmake --output-on-failure
	if [ -n "$(NVCC)" ]; then \
	  cmake -S . -B build/cmake-cuda -G Ninja -DWAN_CMAKE_CUDA=ON -DCMAKE_CUDA_COMPILER=$(NVCC) \
	    -DWAN_CUTLASS_DIR="$$($(VPY) -c 'import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), "source"))')" \
	    > /dev/null && cmake --build build/cmake-cuda && ctest --test-dir build/cmake-cuda --output-on-failure; fi

# GPU readiness without a GPU: every Triton config compiled for sm_80/90/100, no spills, tensor cores used.
readiness: build
	$(VPY) -m tools.readiness

test-py: build
	$(VPY) -m wan_kernels
	$(VPY) -m tools.readiness
	$(VPY) -m pytest -q

test: test-cpp test-py compat

# The Python tests a developer runs while editing (seconds, not minutes): no slow, AOT-compiling or subprocess
# tests (pyproject.toml's markers); `make test` stays the full set.
test-fast: build
	$(VPY) -m pytest -q -m "not slow and not aot and not subprocess"

# The GPU machines run torch 2.11 + triton 3.6 (and so does anyone on torch 2.11): a second venv with exactly those
# (from the registry) builds _C (CPU + sm_90a) from a copy of the tracked tree, runs the self-check, the C++ CPU
# kernel tests, the dispatcher and GPU-check tests, the attention_ws and 8-bit attention AOT checks (Triton 3.6: int8
# Q.K^T on sm_100 is mma.sync, tests/test_attention_int8_aot.py) and readiness for every arch
# (Triton 3.6's ptxas choices differ: configs spill-free under 3.8 spilled under 3.6). (Triton 3.6's CPU interpreter
# cannot run the attention / NVFP4 GEMM kernels, so their interpreter tests run in the main venv only; the compiled
# kernels are what readiness checks here.)
COMPAT_VENV := .venv-compat
COMPAT_SRC := build/compat-src
COMPAT_PINS := torch==2.11.0 triton==3.6.0
COMPAT_TESTS := tests/test_references.py tests/test_attention_cpu.py tests/test_nvfp4.py tests/test_errors.py \
	tests/test_qk_norm_rope.py tests/test_modulate.py tests/test_routing.py tests/test_gpu_check.py
compat:
	test -x $(COMPAT_VENV)/bin/python || $(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/pip install --quiet $(COMPAT_PINS) numpy safetensors tqdm ninja pybind11 "setuptools>=64" \
	  wheel pytest hypothesis
	rm -rf $(COMPAT_SRC) && mkdir -p $(COMPAT_SRC) && git ls-files -z --cached --others --exclude-standard \
	  | tar --null -T - --ignore-failed-read -cf - 2>/dev/null | tar -xf - -C $(COMPAT_SRC)
	cd $(COMPAT_SRC) && WAN_CUDA_ARCHS=9.0a WAN_BUILD_JOBS=$(JOBS) ../../$(COMPAT_VENV)/bin/python setup.py --quiet \
	  build_ext --inplace
	cd $(COMPAT_SRC) && ../../$(COMPAT_VENV)/bin/python -m wan_kernels
	cd $(COMPAT_SRC) && ../../$(COMPAT_VENV)/bin/python -m pytest -q -p no:cacheprovider $(COMPAT_TESTS)
	cd $(COMPAT_SRC) && ../../$(COMPAT_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_attention_ws.py -k aot
	cd $(COMPAT_SRC) && ../../$(COMPAT_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_attention_int8_aot.py
	cd $(COMPAT_SRC) && ../../$(COMPAT_VENV)/bin/python -m tools.readiness

clean:
	rm -rf build wan_kernels/_C*.so *.egg-info $(COMPAT_VENV)
