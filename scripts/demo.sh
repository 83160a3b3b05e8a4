#!/usr/bin/env bash
# Set up .venv and run the main job: build a small Kimi Linear, train it on CPU with the Trainer,
# evaluate, generate with the hybrid cache, save as safetensors and reload it (our class and remote code).
# Extra arguments go to `kimi-hf demo` (see `kimi-hf demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
kimi-hf demo "$@"
