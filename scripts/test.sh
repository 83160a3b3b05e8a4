#!/usr/bin/env bash
# Set up .venv with the test extras and run the CPU test suite (GPU tests skip without CUDA;
# Triton kernels run under Triton's interpreter), in parallel over the machine's cores (pytest-xdist; on CI's two
# cores 6 minutes against 11.5 in one process). Extra arguments go to pytest (e.g. -k ce_lora -x, tests/test_cli.py
# for one file, or -n 0 for one process).
set -euo pipefail
source "$(dirname "$0")/_usage.sh" "$@"
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh test
. .venv/bin/activate
# No test path here: pyproject's testpaths picks tests/ when the arguments name none, and a path among them (e.g.
# tests/test_cli.py, relative to the repository) then runs just that instead of being added to the whole suite.
python -m pytest -q -ra -n auto "$@"
