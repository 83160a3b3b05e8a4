#!/usr/bin/env bash
# Source this at the start of a command on the lent GPU machine (no internet there):
#   source .ci/gpu-setup.sh
# It installs the wheels carried in .whl/ (fla 0.6.0 and Liger-Kernel, the speed anchors) into
# /tmp/site and kimi_hf itself (editable, no dependencies: the image already has torch, triton,
# transformers, peft and accelerate).
set -e
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null
export PYTHONUNBUFFERED=1
# Triton's cache in the working tree: fla 0.6 (FLA_CACHE_RESULTS=1, its default) and TRITON_CACHE_AUTOTUNING
# write each autotuner's choice there as <key>/<kernel>.autotune.json. A fresh machine otherwise re-times every
# candidate config of fla's kernels, which took minutes of each 10-minute call. Keep the choices between calls:
# `bash .ci/gpu-keep-autotune.sh` at the end of a command packs them into $OUT, and the next call unpacks them
# into .triton_cache/ and carries that folder.
export TRITON_CACHE_DIR="$PWD/.triton_cache" TRITON_CACHE_AUTOTUNING=1
mkdir -p "$TRITON_CACHE_DIR"
set +e
python3 - <<'PY'
import torch, triton, transformers, peft
print(f"gpu-setup: {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__} "
      f"transformers {transformers.__version__} peft {peft.__version__}")
PY
