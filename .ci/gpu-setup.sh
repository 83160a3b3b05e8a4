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
set +e
python3 - <<'PY'
import torch, triton, transformers, peft
print(f"gpu-setup: {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__} "
      f"transformers {transformers.__version__} peft {peft.__version__}")
PY
