#!/usr/bin/env bash
# GPU checks and timings, grouped so that one device call (10-minute limit, fresh machine) does as much
# as it can. Run from the repository root on the GPU machine (carry .whl, filled by scripts/fetch_gpu_wheels.sh):
#   bash kernels/benchmarks/gpu_session.sh [WARM_STEP ...] -- [TIMED_STEP ...]
# e.g.  bash kernels/benchmarks/gpu_session.sh tests kda_quick model_quick -- kda_quick model
#
# Compiling the Triton kernels (ours and fla's autotuned ones) takes minutes on a fresh machine and is
# CPU-bound, so the steps before `--` run concurrently: they fill the Triton cache and check correctness,
# and their timings are thrown away (they share the GPU). The steps after `--` then run one at a time on
# a warm cache; only their numbers count. Each step has its own timeout (the full `tests` step's is
# GPU_TESTS_SECONDS, default 240); no warm step runs past
# GPU_WARM_SECONDS (default 300) and no timed step past GPU_SESSION_SECONDS (default 560) from the start, so
# that the autotuning choices below are kept within the device call's 10 minutes. Each step writes $OUT/<step>.log
# (warm runs: $OUT/warm_<step>.log) progressively, so a step cut short keeps what it measured.
# At the end the autotuning choices go to $OUT/triton_autotune.tgz (.ci/gpu-keep-autotune.sh): unpack them into
# .triton_cache/ and carry that folder next time, and fla's kernels skip their minutes of re-tuning. The logs and
# results go back as $OUT/session.tgz (a device call returns at most 8 files).
set -u
source "$(dirname "$0")/../../scripts/_usage.sh" "$@"
start=$SECONDS
deadline=${GPU_SESSION_SECONDS:-560}
cd "$(dirname "$0")/../.."
source .ci/gpu-setup.sh > "${OUT:=/tmp/out}/setup.log" 2>&1 || { cat "$OUT/setup.log"; exit 1; }
head -n 1 "$OUT/setup.log"

step_command() {
  case "$1" in
    tests) echo "timeout ${GPU_TESTS_SECONDS:-240} python3 -m pytest -q -m gpu tests -p no:cacheprovider --tb=short -rf" ;;
    # the KDA kernels' GPU tests and the model's in-model op tests: a shorter warm step for calls
    # that mostly time KDA
    kda_tests) echo "timeout 240 python3 -m pytest -q -m gpu tests/test_kda_gpu.py tests/test_kimi_linear_gpu.py \
      -p no:cacheprovider --tb=short -rf \
      --deselect tests/test_kimi_linear_gpu.py::test_logits_match_transformers_native_class" ;;
    # the conv and gated-norm GPU tests, and the model's in-model op tests (which run both)
    conv_norm_tests) echo "timeout 200 python3 -m pytest -q -m gpu tests/test_conv_ops.py tests/test_gated_norm_ops.py \
      tests/test_kimi_linear_gpu.py -p no:cacheprovider --tb=short -rf \
      --deselect tests/test_kimi_linear_gpu.py::test_logits_match_transformers_native_class" ;;
    attn_res_tests) echo "timeout 240 python3 -m pytest -q -m gpu tests/test_attn_res_ops.py tests/test_attn_res_model.py \
      -p no:cacheprovider --tb=short -rf" ;;
    # KDA_SET="kda.chunk.NAME=V ...": launch constants for the kda step (e.g. kda.chunk.CHUNK_DOTS_FUSE=1)
    kda) echo "timeout 240 python3 kernels/benchmarks/bench_kda.py --profile ${KDA_SET:+--set $KDA_SET} \
      --json $OUT/$2kda.json" ;;
    # KDA_SWEEP="NAME=v1,v2 ..." (constants of kda.chunk), at KDA_SWEEP_SHAPE (BxT, default 1x8192; the step
    # kda_sweep:BxT names its own), fastest by KDA_SWEEP_BY (fwd or fwd+bwd, default fwd+bwd)
    kda_sweep|kda_sweep:*) shape=${1#kda_sweep}; shape=${shape#:}
      echo "timeout 200 python3 kernels/benchmarks/bench_kda.py \
      --sweep ${KDA_SWEEP:?set KDA_SWEEP} --sweep-shape ${shape:-${KDA_SWEEP_SHAPE:-1x8192}} \
      --best-by ${KDA_SWEEP_BY:-fwd+bwd}" ;;
    # KDA_AB_TREE: another tree's kernels/kda folder, carried (kda_ab.sh says how to make it): ours alone at B8 T4096,
    # this checkout's kernels and that tree's in alternation
    kda_ab) echo "timeout 300 bash kernels/benchmarks/kda_ab.sh ${KDA_AB_TREE:?set KDA_AB_TREE}" ;;
    kda_quick) echo "timeout 200 python3 kernels/benchmarks/bench_kda.py --quick --profile --json $OUT/$2kda_quick.json" ;;
    model) echo "timeout 480 python3 kernels/benchmarks/bench_model.py --no-parity --profile --json $OUT/$2model.json" ;;
    # our training steps alone, with their GPU time per kernel
    model_train) echo "timeout 240 python3 kernels/benchmarks/bench_model.py --skip-native --no-parity --parts train \
      --profile --json $OUT/$2model_train.json" ;;
    # our decoding alone, with where one growing-cache generate spends its host time
    model_decode_host) echo "timeout 240 python3 kernels/benchmarks/bench_model.py --skip-native --no-parity --parts decode \
      --profile --profile-host 30" ;;
    # decoding after a 16K-token prompt, MLA in the latent space (the default from 1024 cached positions) and expanded
    model_long_decode) echo "timeout 270 python3 kernels/benchmarks/bench_model.py --skip-native --no-parity --parts decode \
      --decode-prompt 16384 --decode-repeats 1 --json $OUT/$2model_long_decode.json" ;;
    model_long_decode_expanded) echo "timeout 270 python3 kernels/benchmarks/bench_model.py --skip-native --no-parity \
      --parts decode --decode-prompt 16384 --decode-repeats 1 --mla-latent-min-keys 1000000" ;;
    model_quick) echo "timeout 200 python3 kernels/benchmarks/bench_model.py --no-parity --rep 1 --decode-repeats 1" ;;
    attn_res) echo "timeout 330 python3 kernels/benchmarks/bench_attn_res.py --json $OUT/$2attn_res.json" ;;
    attn_res_graphs) echo "timeout 200 python3 kernels/benchmarks/bench_attn_res.py --model kimi_linear --impls triton \
      --baselines triton --static-cache --json $OUT/$2attn_res_graphs.json" ;;
    attn_res_paired) echo "timeout 330 python3 kernels/benchmarks/bench_attn_res_paired.py --json $OUT/$2attn_res_paired.json" ;;
    attn_res_sweep) echo "timeout 120 python3 kernels/benchmarks/bench_small_ops.py --sections attn_res \
      --sweep attn_res.fused.FWD_SOURCE_TILE=1,2,4 attn_res.fused.FWD_ELEMENTS_PER_THREAD=16,8" ;;
    # the two-phase prefill's kernels (the dense model's block boundary misses the 2% target) at each row warp count,
    # by kernel GPU time; ROW_WARPS also sets the anchor, the standard residual's RMSNorm
    attn_res_prefill_sweep) echo "timeout 150 python3 kernels/benchmarks/bench_small_ops.py --sections attn_res_prefill \
      --gpu-time --sweep attn_res.fused.ROW_WARPS=4,8,16" ;;
    attn_res_replication)
      echo "timeout 170 python3 recipes/attn_res_replication.py --preset gpu --output-dir $OUT/attn_res_replication" ;;
    ce_lora) echo "timeout 360 python3 kernels/benchmarks/bench_ce_lora.py --json $OUT/$2ce_lora.json" ;;
    ce_lora_tests) echo "timeout 240 python3 -m pytest -q -m gpu tests/test_ce_lora_gpu.py \
      -p no:cacheprovider --tb=short -rf" ;;
    # the per-layer part alone, at the ratios the FLOP-bound target names
    ce_lora_layers) echo "timeout 200 python3 kernels/benchmarks/bench_ce_lora.py --skip-model --ratios 0.25 0.5 0.65 \
      --json $OUT/$2ce_lora_layers.json" ;;
    # the ~0.9B Llama step at ratio 0.5 against PEFT LoRA (bf16 adapters, no checkpointing), with its kernels' GPU
    # time; ce_lora_step_liger: every setting on Liger-Kernel's fused Llama ops; ce_lora_step[_liger]:NAME=V sets the
    # launch constant ce_lora.pack.NAME for the run
    ce_lora_step|ce_lora_step:*|ce_lora_step_liger|ce_lora_step_liger:*) name=${1%%:*}; set=${1#"$name"}; set=${set#:}
      echo "timeout 300 python3 kernels/benchmarks/bench_ce_lora.py --skip-layers --settings PEFT 0.5 \
      --adapter-dtypes bf16 --checkpointing off --profile --profile-host ${CE_LORA_HOST_TOP:-0} \
      ${set:+--set ce_lora.pack.$set} \
      $([ "$name" = ce_lora_step_liger ] && echo --liger) --json $OUT/$2$name${set:+_$set}.json" ;;
    # PEFT's default fp32 adapters on the bf16 model (kimi_hf.kernels.lora_branch): PEFT LoRA, our exact layer and
    # ratio 0.5, with and without checkpointing; ce_lora_step_fp32_liger: on Liger-Kernel's ops, no checkpointing
    ce_lora_step_fp32) echo "timeout 300 python3 kernels/benchmarks/bench_ce_lora.py --skip-layers \
      --settings PEFT exact 0.5 --adapter-dtypes fp32 --checkpointing both --json $OUT/$2ce_lora_step_fp32.json" ;;
    ce_lora_step_fp32_liger) echo "timeout 200 python3 kernels/benchmarks/bench_ce_lora.py --skip-layers \
      --settings PEFT exact 0.5 --adapter-dtypes fp32 --checkpointing off --liger \
      --json $OUT/$2ce_lora_step_fp32_liger.json" ;;
    # CE_LORA_PACK_SWEEP="NAME=v1,v2 ..." (constants of ce_lora.pack, e.g. CONFIG=-1,0,1 PROGRAMS_PER_SM=1,4): the
    # packing pass at the step's and the per-layer part's shapes, every combination, by its kernel's GPU time (the
    # launcher's host time exceeds the kernel at the step's smaller shapes, and do_bench's times followed it)
    ce_lora_pack_sweep) echo "timeout 240 python3 kernels/benchmarks/bench_small_ops.py --sections ce_lora_pack --gpu-time \
      --sweep $(sed 's/\([A-Z_]*=\)/ce_lora.pack.\1/g' <<< "${CE_LORA_PACK_SWEEP:?set CE_LORA_PACK_SWEEP}")" ;;
    ce_lora_quality)
      echo "timeout 240 python3 recipes/ce_lora_quality.py --preset gpu --output-dir $OUT/ce_lora_quality" ;;
    small_ops) echo "timeout 120 python3 kernels/benchmarks/bench_small_ops.py --sections conv norm kda" ;;
    # conv_sweep / norm_sweep: CONV_SWEEP / NORM_SWEEP="NAME=v1,v2 ..." (constants of conv.triton_kernels /
    # gated_norm.triton_kernels), every combination timed by its kernels' GPU time
    conv_sweep) echo "timeout 200 python3 kernels/benchmarks/bench_small_ops.py --sections conv --gpu-time \
      --sweep $(sed 's/\([A-Z_]*=\)/conv.triton_kernels.\1/g' <<< "${CONV_SWEEP:?set CONV_SWEEP}")" ;;
    norm_sweep) echo "timeout 120 python3 kernels/benchmarks/bench_small_ops.py --sections norm --gpu-time \
      --sweep $(sed 's/\([A-Z_]*=\)/gated_norm.triton_kernels.\1/g' <<< "${NORM_SWEEP:?set NORM_SWEEP}")" ;;
    *) return 1 ;;
  esac
}

warm=()
timed=()
seen_separator=0
for arg in "$@"; do
  if [ "$arg" = "--" ]; then seen_separator=1; continue; fi
  step_command "$arg" x > /dev/null || { echo "unknown step $arg"; exit 2; }
  if [ $seen_separator = 1 ]; then timed+=("$arg"); else warm+=("$arg"); fi
done

for step in "${warm[@]}"; do
  ( timeout "${GPU_WARM_SECONDS:-300}" $(step_command "$step" warm_) > "$OUT/warm_$step.log" 2>&1; echo "== warm $step (exit $?)" ) &
done
wait
for step in "${warm[@]}"; do
  # (not "warn" alone: pytest's summary line says "N passed, M warnings")
  grep -E "passed|failed|error|Error" "$OUT/warm_$step.log" | grep -v -E "Warning:|warnings\.warn" | tail -n 8
done
for step in "${timed[@]}"; do
  left=$((deadline - (SECONDS - start)))
  if [ $left -lt 30 ]; then echo "== $step skipped: ${left} s left of GPU_SESSION_SECONDS"; continue; fi
  timeout $left $(step_command "$step" "") > "$OUT/$step.log" 2>&1
  echo "== $step (exit $?)"
  grep -v -i "warn" "$OUT/$step.log" | tail -n 30
done
bash .ci/gpu-keep-autotune.sh
# A device call returns at most 8 files: everything but the autotuning choices goes back as one archive.
cd "$OUT" && tar czf /tmp/session.tgz --exclude=triton_autotune.tgz . \
  && find . -type f ! -name triton_autotune.tgz -delete && mv /tmp/session.tgz .
