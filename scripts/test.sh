#!/usr/bin/env bash
# Set up .venv with the test extras and run the CPU test suite (GPU tests skip without CUDA;
# Triton kernels run under Triton's interpreter). Extra arguments go to pytest (e.g. -k ce_lora -x).
set -euo pipefail
source "$(dirname "$0")/_usage.sh" "$@"
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh test
. .venv/bin/activate
python -m pytest -q -ra tests "$@"
