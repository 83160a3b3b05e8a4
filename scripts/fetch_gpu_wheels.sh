#!/usr/bin/env bash
# Download the speed anchors' wheels into .whl/ for the lent GPU machine, which has no internet
# (.ci/gpu-setup.sh installs them there): fla 0.6.0 (flash-linear-attention and fla-core) and Liger-Kernel 0.8.5.
# .whl/ is not committed; run this on a machine with PyPI before the first GPU call, then carry .whl.
#   bash scripts/fetch_gpu_wheels.sh
set -euo pipefail
source "$(dirname "$0")/_usage.sh" "$@"
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps -d .whl "flash-linear-attention==0.6.0" "fla-core==0.6.0" "liger-kernel==0.8.5"
ls .whl
