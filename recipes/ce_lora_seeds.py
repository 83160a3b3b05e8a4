"""CE-LoRA against LoRA over several seeds: paired differences with confidence intervals.

One run of ``ce_lora_quality.py`` compares the methods on one pre-trained base model and one data draw; from seed to
seed the gap between methods moves by more than the quality criterion (eval loss within 2%, exact match within 1
point), so one seed cannot decide it. This script runs the recipe for each ``--seeds`` value (in ``<output-dir>/
seed_<s>``; a seed whose ``results.csv`` holds every method is reused, so an interrupted sweep resumes) and pairs
each CE-LoRA setting with LoRA on the same seed:

- loss gap: ``100 * (eval_loss / LoRA's - 1)`` (%), exact-match gap: ``100 * (exact_match - LoRA's)`` (points);
- over the seeds: mean, standard deviation and a two-sided 95% Student-t interval of the mean;
- "not worse than LoRA": the interval's worse end within the criterion (loss gap <= +2%, exact-match gap >= -1).

Seeds whose base model did not learn its pre-training task (exact match below ``--min-base-exact-match``, default
10%; guessing gets about 0) are listed and left out: their fine-tuning starts from noise.

    python recipes/ce_lora_seeds.py --preset cpu_unsaturated --seeds 10 11 12 13 --output-dir seeds

Writes ``summary.csv`` (one row per seed and setting) and ``summary.md`` (the table and the intervals).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # ce_lora_quality.py, without the repo root
import ce_lora_quality  # noqa: E402

# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (then the normal's 1.96).
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
    2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip
# (gap, label, unit, limit): the loss gap may be at most +2% (worse is higher), the exact-match gap at least -1
# point (worse is lower); the interval's end on the worse side is what must stay within the limit.
CRITERIA = (
    ("loss_gap_pct", "eval loss gap", "%", 2.0),
    ("exact_match_gap_points", "exact-match gap", " points", -1.0),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", required=True, help="seeds of the recipe, one run each")
    p.add_argument("--preset", choices=sorted(ce_lora_quality.PRESETS), default="cpu_unsaturated")
    p.add_argument("--output-dir", "--out", dest="out", default="ce_lora_seeds", help="output folder")
    p.add_argument("--min-base-exact-match", type=float, default=0.1,
                   help="leave out seeds whose base model scores below this on its pre-training task")  # fmt: skip
    args = p.parse_args(argv)
    if not 0.0 <= args.min_base_exact_match <= 1.0:
        p.error(f"--min-base-exact-match is a fraction in [0, 1], got {args.min_base_exact_match}")
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds has repeats: {args.seeds}")
    return args


def _read_rows(path: str) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def run_seed(seed: int, preset: str, out: str) -> list[dict]:
    """The recipe's ``results.csv`` rows for ``seed`` (run now, or read back when the folder holds every method)."""
    folder = os.path.join(out, f"seed_{seed}")
    results = os.path.join(folder, "results.csv")
    expected = 1 + len(ce_lora_quality.parse_args([]).ratios)  # LoRA and one row per default ratio
    if not (os.path.exists(results) and len(_read_rows(results)) == expected):
        print(f"== seed {seed}: running {preset} into {folder}", flush=True)
        ce_lora_quality.main(["--preset", preset, "--seed", str(seed), "--output-dir", folder])
    else:
        print(f"== seed {seed}: reusing {results}", flush=True)
    return _read_rows(results)


def paired_gaps(rows: list[dict]) -> list[dict]:
    """Per seed and CE-LoRA setting: the loss gap (%) and exact-match gap (points) against LoRA on that seed."""
    gaps = []
    for seed in dict.fromkeys(r["seed"] for r in rows):
        runs = {r["method"]: r for r in rows if r["seed"] == seed}
        if "LoRA" not in runs:
            raise ValueError(f"seed {seed} has no LoRA row to pair with: methods {sorted(runs)}")
        lora = runs.pop("LoRA")
        for method, r in runs.items():
            gaps.append({
                "seed": int(seed), "method": method,
                "loss_gap_pct": 100 * (float(r["eval_loss"]) / float(lora["eval_loss"]) - 1),
                "exact_match_gap_points": 100 * (float(r["exact_match"]) - float(lora["exact_match"])),
            })  # fmt: skip
    return gaps


def interval(values: list[float]) -> tuple[float, float, float, float]:
    """(mean, standard deviation, lower, upper) with the two-sided 95% Student-t interval of the mean; the
    deviation and interval are NaN for fewer than two values."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan, math.nan, math.nan
    std = statistics.stdev(values)
    half = (_T975[len(values) - 2] if len(values) - 1 <= len(_T975) else 1.96) * std / math.sqrt(len(values))
    return mean, std, mean - half, mean + half


def summarize(gaps: list[dict], excluded: dict[int, float], preset: str) -> str:
    """The markdown summary: per-seed gaps, then per setting the intervals and the criterion verdicts."""
    methods = list(dict.fromkeys(g["method"] for g in gaps))
    seeds = sorted({g["seed"] for g in gaps})
    lines = [
        f"CE-LoRA vs LoRA over {len(seeds)} seeds (`ce_lora_quality.py --preset {preset}`); gaps against LoRA on the "
        "same seed (loss: % of LoRA's eval loss, > 0 worse; exact match: points, < 0 worse)",
        "",
    ]
    if excluded:
        left_out = ", ".join(f"{s} ({100 * em:.1f}%)" for s, em in sorted(excluded.items()))
        lines += [f"Left out (base model's exact match on its pre-training task below the threshold): {left_out}", ""]
    lines += ["| seed | " + " | ".join(f"{m}: loss | {m}: EM" for m in methods) + " |",
              "|---" * (1 + 2 * len(methods)) + "|"]  # fmt: skip
    for seed in seeds:
        cells = []
        for m in methods:
            g = next(g for g in gaps if g["seed"] == seed and g["method"] == m)
            cells += [f"{g['loss_gap_pct']:+.1f}%", f"{g['exact_match_gap_points']:+.1f}"]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    header = "| setting | measure | mean | median | std | 95% interval of mean | not worse than LoRA beyond limit |"
    lines += ["", header, "|---" * 7 + "|"]
    for m in methods:
        for key, label, unit, limit in CRITERIA:
            values = [g[key] for g in gaps if g["method"] == m]
            mean, std, low, high = interval(values)
            median = statistics.median(values)  # the relative loss gap has heavy tails where LoRA's loss is tiny
            worse_end = high if limit > 0 else low
            if math.isnan(worse_end):
                verdict = "undecided (one seed)"
            else:
                met = worse_end <= limit if limit > 0 else worse_end >= limit
                verdict = f"{'yes' if met else 'not shown'} (worse end {worse_end:+.2f}{unit}, limit {limit:+g}{unit})"
            lines.append(f"| {m} | {label} | {mean:+.2f}{unit} | {median:+.2f}{unit} | {std:.2f} | "
                         f"[{low:+.2f}, {high:+.2f}] | {verdict} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    rows, excluded = [], {}
    for seed in args.seeds:
        seed_rows = run_seed(seed, args.preset, args.out)
        base = float(seed_rows[0]["base_pretrain_exact_match"])
        if base < args.min_base_exact_match:
            excluded[seed] = base
        else:
            rows += seed_rows
    gaps = paired_gaps(rows) if rows else []
    if gaps:
        with open(os.path.join(args.out, "summary.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(gaps[0]))
            writer.writeheader()
            writer.writerows(gaps)
    table = summarize(gaps, excluded, args.preset) if gaps else f"no seed passed pre-training: {excluded}"
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    return table


if __name__ == "__main__":
    main()
