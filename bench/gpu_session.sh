#!/usr/bin/env bash
# One prepared device call for a session lent a GPU (no network there): the attention tile sweep,
# then `make gpu` (every CUDA test + the GPU benchmark). Results and logs go to $OUT (or ./gpu-out).
#   bash bench/gpu_session.sh            # about 7-8 minutes on an H200
# The sweep writes decision.env (whether the Hopper TMA forward / the atomic-dq backward are right and
# faster); the tests and the benchmark then run with that choice, so the table measures the path the
# sweep picked. Seen on an H200 (2026-12-04): sweep ~130 s; CUDA tests ~100-200 s cold (Triton
# compiles ~200 kernel variants; 41 s with a warm cache, -n 16); benchmark of attention + paged
# decode ~35 s, every op several minutes (torch.compile providers). Budgets: SWEEP_S, TEST_S, BENCH_S.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
touch /tmp/gpu_session_start
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv
python3 -c "import trajops.triton_kernels" 2>/dev/null || \
    TRAJOPS_NO_EXT=1 python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | tail -2
timeout "${SWEEP_S:-170}" python3 bench/sweep_attention.py --out "$OUT" 2>&1 | grep -v "compile + first"
set -a; [ -f "$OUT/decision.env" ] && . "$OUT/decision.env"; set +a
rm -f "$OUT/decision.env"  # (a device call returns at most 8 files)
echo "TRAJOPS_ATTN_TMA=${TRAJOPS_ATTN_TMA:-0} TRAJOPS_ATTN_ATOMIC_DQ=${TRAJOPS_ATTN_ATOMIC_DQ:-0}"
# the commands of `make gpu-test` / `make gpu-bench`, spelled out (no dependency on make being there)
XD=$(python3 -c "import xdist" >/dev/null 2>&1 && echo "-n 16")
timeout "${TEST_S:-200}" python3 -m pytest -q -p no:cacheprovider $XD tests/*_cuda.py > "$OUT/tests.log" 2>&1
echo "gpu-test rc=$?"
# a timed-out pytest leaves its xdist workers running on the GPU: they would skew every timing below
pkill -f "[x]dist" ; pkill -f "[p]ytest" ; sleep 1
grep -E "passed|failed|FAILED" "$OUT/tests.log" | tail -25
timeout "${BENCH_S:-240}" python3 bench/run.py --device cuda --budget-s 0.3 --first temperature_attention \
    paged_temperature_attention multiscale_attention trajectory_flow stp_loss > "$OUT/bench.log" 2>&1; echo "gpu-bench rc=$?"
find bench/results -type f -newer /tmp/gpu_session_start -exec cp {} "$OUT/" \;
grep -E "^\| temperature_attention|^\| paged" "$OUT/bench.log" | head -20
