#!/usr/bin/env bash
# Pack the autotuning choices of this GPU call (see .ci/gpu-setup.sh) into $OUT/triton_autotune.tgz: only the
# small *.autotune.json files, not the compiled kernels (each call recompiles the chosen configs in seconds).
# Next call: `mkdir -p .triton_cache && tar xzf triton_autotune.tgz -C .triton_cache`, then carry .triton_cache.
set -euo pipefail
cd "${TRITON_CACHE_DIR:?source .ci/gpu-setup.sh first}"
find . -name '*.autotune.json' -print0 | tar czf "${OUT:?}/triton_autotune.tgz" --null -T -
echo "kept $(find . -name '*.autotune.json' | wc -l) autotuning choices in $OUT/triton_autotune.tgz"
