#!/usr/bin/env bash
# A second prepared device call, for the decode work (issues 14 and 16): the CUDA tests of the KV cache and the
# paged attention (the forward cache's CUDA cases among them), the host time of a decode step per op and per layer
# (bench/decode_host.py), then generate() with the evicting cache against the dense cache (bench_hf_generate:
# the short padded case and the 1k / 4k / 8k context sweep on SmolLM2's architecture, bf16). No network needed.
#   OUT=gpu-out bash bench/gpu_session_decode.sh     # about 5 minutes (budgets: TEST_S, HOST_S, HF_S)
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv
python3 -c "import trajops.triton_kernels" 2>/dev/null || \
    TRAJOPS_NO_EXT=1 python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | tail -2
timeout "${TEST_S:-150}" python3 -m pytest -q -p no:cacheprovider tests/test_kv_cache_cuda.py \
    tests/test_paged_temperature_attention_cuda.py > "$OUT/tests-decode.log" 2>&1
echo "decode tests rc=$?"; grep -E "passed|failed|FAILED|Error" "$OUT/tests-decode.log" | tail -15
timeout "${HOST_S:-60}" python3 bench/decode_host.py --device cuda --out "$OUT" 2>&1 | tail -12
timeout "${HF_S:-180}" python3 bench/run.py --device cuda --ops hf_generate --budget-s 0.5 --out "$OUT" \
    > "$OUT/hf.log" 2>&1; echo "hf_generate rc=$?"
grep -E "^\| hf_generate" "$OUT/hf.log" | head -12
