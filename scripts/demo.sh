#!/usr/bin/env bash
# Set up .venv and run the main job: build a small Kimi Linear, train it on CPU with the Trainer,
# evaluate, generate with the hybrid cache, save as safetensors and reload it (our class and remote code).
# Extra arguments go to `kimi-hf demo`; --help lists them once .venv exists (without setting anything up).
set -euo pipefail
usage_extra() {
  local cli
  cli="$(dirname "$0")/../.venv/bin/kimi-hf"
  if [ -x "$cli" ]; then
    echo
    "$cli" demo --help
  else
    echo "(the options of \`kimi-hf demo\` are listed here once .venv exists: run \`bash scripts/demo.sh\` once)"
  fi
}
source "$(dirname "$0")/_usage.sh" "$@"
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
kimi-hf demo "$@"
