#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv with kimi_hf installed in editable mode.
#   bash scripts/setup_env.sh            runtime dependencies only
#   bash scripts/setup_env.sh test       plus the test extras (pytest, fla 0.6.0 as an independent reference)
# torch is pinned to the 2.13.0 CPU wheel first: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
source "$(dirname "$0")/_usage.sh" "$@"
cd "$(dirname "$0")/.."
extras="${1:-}"
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
if [ -n "$extras" ]; then
  python -m pip install -q -e ".[$extras]"
else
  python -m pip install -q -e .
fi
