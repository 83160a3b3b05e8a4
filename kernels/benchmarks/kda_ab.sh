#!/usr/bin/env bash
# Time this checkout's KDA kernels against another tree's on one GPU, in alternation, ours alone at one shape:
#   bash kernels/benchmarks/kda_ab.sh OTHER_KDA_FOLDER [BxT] [ROUNDS]
# OTHER_KDA_FOLDER holds the other tree's kernels/kda/*.py. Make it before the device call (the lent machine gets
# the working tree, not the git history), in an ignored folder that the call carries, e.g.
#   mkdir -p .scratch/base && git archive main kernels/kda | tar -x -C .scratch/base   # -> .scratch/base/kernels/kda
# Each of ROUNDS rounds (default 2) copies this checkout's files, then the other tree's, into kernels/kda/ and runs
# `bench_kda.py --sweep WU_STAGES=1` at BxT (default 8x4096): the forward and fwd+bwd medians of the kernels'
# defaults, in a fresh process per tree, so a change shows against the spread between rounds. The checkout's own
# files are put back at exit, also after an error or a timeout. Session 41 compared a candidate this way (BENCHMARKS.md,
# KDA section): two rounds took about 70 s on a fresh H100.
set -euo pipefail
source "$(dirname "$0")/../../scripts/_usage.sh" "$@"
other="$(cd "${1:?usage: kda_ab.sh OTHER_KDA_FOLDER [BxT] [ROUNDS] (see --help)}" && pwd)"  # before the cd below
shape="${2:-8x4096}"
rounds="${3:-2}"
cd "$(dirname "$0")/../.."
ls "$other"/chunk.py > /dev/null
own="$(mktemp -d)"
cp kernels/kda/*.py "$own"/
# A tree's modules exactly: its files copied over, then the modules it lacks removed (never an empty folder between).
use() {
  cp "$1"/*.py kernels/kda/
  for module in kernels/kda/*.py; do [ -e "$1/${module##*/}" ] || rm "$module"; done
}
# The restore ignores INT and TERM, and so do the cp and rm it starts: `timeout` signals the whole process group just
# after the script, and on a loaded machine that second signal reached a cp of the restore (CI, session 45: the
# checkout's kernels/kda left empty).
trap 'trap "" INT TERM; use "$own" && rm -r "$own"' EXIT
for round in $(seq "$rounds"); do
  for tree in checkout other; do
    if [ "$tree" = checkout ]; then use "$own"; else use "$other"; fi
    echo "== $tree, round $round: | WU_STAGES | fwd ms | fwd+bwd ms | diff |"
    python3 kernels/benchmarks/bench_kda.py --sweep WU_STAGES=1 --sweep-shape "$shape" 2>&1 \
      | grep -E "^\| 1 \||rror" || echo "(bench_kda.py failed or printed no row)"
  done
done
