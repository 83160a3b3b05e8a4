#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv with kimi_hf installed in editable mode; a .venv already set up
# for this pyproject.toml is reused without installing anything (no package index needed).
#   bash scripts/setup_env.sh            runtime dependencies only
#   bash scripts/setup_env.sh test       plus the test extras (pytest, fla 0.6.0 as an independent reference)
# torch is pinned to 2.13.0 and installed first: that is the CPU wheel where pip's index serves one (PyPI itself
# serves the multi-GB CUDA build on Linux; pip's PIP_INDEX_URL / PIP_EXTRA_INDEX_URL choose the index).
set -euo pipefail
source "$(dirname "$0")/_usage.sh" "$@"
cd "$(dirname "$0")/.."
extras="${1:-}"
# Installing needs the package index (pip's upgrade, the editable build's backend) even when everything is there:
# a .venv completely set up before for this pyproject.toml (and these extras) is reused as it is, so that the demo
# and the tests run again offline. The stamp holds "<sha256 of pyproject.toml> <extras>"; delete .venv to reinstall.
stamp=.venv/.kimi_hf_setup
digest="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ -f "$stamp" ]; then
  read -r done_digest done_extras < "$stamp" || true
  if [ "$done_digest" = "$digest" ] && { [ -z "$extras" ] || [ "${done_extras:-}" = "$extras" ]; }; then
    echo "reusing .venv (set up for this pyproject.toml${extras:+ with [$extras]}; delete .venv to reinstall)"
    exit 0
  fi
fi
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
if [ -n "$extras" ]; then
  python -m pip install -q -e ".[$extras]"
else
  python -m pip install -q -e .
fi
echo "$digest $extras" > "$stamp"
