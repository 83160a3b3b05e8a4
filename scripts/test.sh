#!/usr/bin/env bash
# Set up .venv with the test extras and run the CPU test suite (GPU tests skip without CUDA;
# Triton kernels run under Triton's interpreter). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh test
. .venv/bin/activate
python -m pytest -q -ra tests "$@"
