# The README's commands. Everything runs from the virtual environment at .venv (created on first use,
# reused while requirements.txt is unchanged). `make demo` = the main job, `make test` = every check.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
DEPS := $(VENV)/.deps-installed
JOBS ?= 2

.PHONY: all venv build demo info readiness test test-cpp test-py clean

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
	$(VPY) -m wan_kernels.readiness

test-py: build
	$(VPY) -m wan_kernels
	$(VPY) -m wan_kernels.readiness
	$(VPY) -m pytest -q

test: test-cpp test-py

clean:
	rm -rf build wan_kernels/_C*.so *.egg-info
