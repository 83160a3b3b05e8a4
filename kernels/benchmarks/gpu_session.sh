#!/usr/bin/env bash
# GPU checks and timings, grouped so that each device call fits the 10-minute limit on a fresh
# machine. Run from the repository root on the GPU machine (carry .whl):
#   bash kernels/benchmarks/gpu_session.sh [tests|kda|model|attn_res|ce_lora|small_ops ...]
# With no argument it runs the GPU tests and the model benchmark (about 8 minutes); give the other
# steps their own call.
#
# Compiling the Triton kernels (ours and fla's) takes minutes on a fresh machine, so every step gets
# its own generous timeout and writes its output progressively to $OUT/<step>.log: a step cut short
# keeps what it measured, and later steps still run.
set -u
cd "$(dirname "$0")/../.."
source .ci/gpu-setup.sh > "${OUT:=/tmp/out}/setup.log" 2>&1 || { cat "$OUT/setup.log"; exit 1; }
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(tests model)
for step in "${steps[@]}"; do
  case "$step" in
    tests) timeout 240 python3 -m pytest -q -m gpu tests -p no:cacheprovider --tb=line -rf ;;
    kda) timeout 200 python3 kernels/benchmarks/bench_kda.py --json "$OUT/kda.json" ;;
    model) timeout 240 python3 kernels/benchmarks/bench_model.py --json "$OUT/model.json" ;;
    attn_res) timeout 200 python3 kernels/benchmarks/bench_attn_res.py --model kimi_linear ;;
    ce_lora) timeout 200 python3 kernels/benchmarks/bench_ce_lora.py --skip-layers --json "$OUT/ce_lora.json" ;;
    small_ops) timeout 120 python3 kernels/benchmarks/bench_small_ops.py --sections conv norm kda ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac > "$OUT/$step.log" 2>&1
  echo "== $step (exit $?)"
  grep -v -i "warn" "$OUT/$step.log" | tail -n 25
done
