#!/usr/bin/env bash
# Set up .venv and run the main job: build a small Kimi Linear, train it on CPU with the Trainer,
# evaluate, generate with the hybrid cache, save as safetensors and reload it (our class and remote code).
# Extra arguments go to `kimi-hf demo`; --help lists them once .venv exists (without setting anything up).
# It writes to outputs/demo under the current folder unless --output-dir says otherwise.
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
root="$(cd "$(dirname "$0")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
# Run from the caller's folder, not the repository's: a relative --output-dir is the one the user typed.
"$root/.venv/bin/kimi-hf" demo "$@"
