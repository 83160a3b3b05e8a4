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

By default each seed pre-trains its own base model, so the spread over seeds mixes base models and fine-tuning runs.
``--base-seed S`` pre-trains one base model (seed ``S``, kept in ``<output-dir>/base``) and fine-tunes it once per
seed: the spread is then that of fine-tuning alone. Arguments after ``--`` go to every run of the recipe.

    python recipes/ce_lora_seeds.py --preset cpu_unsaturated --seeds 10 11 12 13 --output-dir seeds
    python recipes/ce_lora_seeds.py --seeds 0 1 2 3 --base-seed 0 --output-dir shared -- --pretrain-steps 600

Writes ``summary.csv`` (one row per seed and setting), ``summary.md`` (the table and the intervals) and
``curves.png`` (the eval loss per step, averaged over the seeds).
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import os
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # ce_lora_quality.py, without the repo root
import ce_lora_quality  # noqa: E402

from kimi_hf.cli import check_output_dir, seed_int  # noqa: E402

# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (beyond: `t975`'s expansion).
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
    p.add_argument("--seeds", type=seed_int, nargs="+", required=True, help="seeds of the recipe, one run each")
    p.add_argument("--preset", choices=sorted(ce_lora_quality.PRESETS), default="cpu_unsaturated")
    p.add_argument("--output-dir", "--out", dest="out", default="ce_lora_seeds", help="output folder")
    p.add_argument("--min-base-exact-match", type=float, default=0.1,
                   help="leave out seeds whose base model scores below this on its pre-training task")  # fmt: skip
    p.add_argument("--base-seed", type=seed_int, default=None,
                   help="fine-tune one base model, pre-trained with this seed, for every seed")  # fmt: skip
    argv = sys.argv[1:] if argv is None else list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:split])
    args.recipe_args = argv[split + 1 :]
    # --replot would redraw a plot instead of running: the sweep would then read a missing or stale results.csv
    reserved = {"--seed", "--output-dir", "--out", "--preset", "--tiny", "--base-seed", "--base-dir", "--replot"}
    taken = sorted(reserved & {a.split("=")[0] for a in args.recipe_args})
    if taken:
        p.error(f"the sweep owns {', '.join(taken)} (each seed's run, folder and preset); drop it from the recipe "
                "arguments after --")
    if not 0.0 <= args.min_base_exact_match <= 1.0:
        p.error(f"--min-base-exact-match is a fraction in [0, 1], got {args.min_base_exact_match}")
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds has repeats: {args.seeds}")
    check_output_dir(p, args.out)  # the recipe checks only <out>/seed_<s>: a file here was a FileExistsError
    ce_lora_quality.parse_args(recipe_argv(args, args.seeds[0]))  # the recipe's own checks, before anything is written
    return args


def _read_rows(path: str) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def recipe_argv(args: argparse.Namespace, seed: int) -> list[str]:
    """The recipe's command line for ``seed``."""
    argv = ["--preset", args.preset, "--seed", str(seed), "--output-dir", os.path.join(args.out, f"seed_{seed}")]
    if args.base_seed is not None:
        argv += ["--base-seed", str(args.base_seed), "--base-dir", os.path.join(args.out, "base")]
    return argv + args.recipe_args


def check_folder(args: argparse.Namespace) -> None:
    """Record the sweep's settings in ``<output-dir>/sweep.json``, or refuse (exit with an error) a folder that holds
    another sweep's runs: they would be read back as if they were this one's. A folder without runs takes the new
    settings."""
    settings = {"preset": args.preset, "base_seed": args.base_seed, "recipe_args": args.recipe_args}
    path = os.path.join(args.out, "sweep.json")
    has_runs = bool(glob.glob(os.path.join(args.out, "seed_*", "results.csv")))
    if os.path.exists(path) and has_runs:
        with open(path) as f:
            saved = json.load(f)
        if saved != settings:
            raise SystemExit(
                f"ce_lora_seeds.py: error: --output-dir {args.out} holds runs of another sweep: {saved}, not "
                f"{settings}; use another folder"
            )
    with open(path, "w") as f:
        json.dump(settings, f)


def run_seed(seed: int, args: argparse.Namespace) -> list[dict]:
    """The recipe's ``results.csv`` rows for ``seed`` (run now, or read back when the folder holds every method)."""
    argv = recipe_argv(args, seed)
    folder = argv[argv.index("--output-dir") + 1]
    results = os.path.join(folder, "results.csv")
    expected = 1 + len(ce_lora_quality.parse_args(argv).ratios)  # LoRA and one row per CE-LoRA ratio
    if not (os.path.exists(results) and len(_read_rows(results)) == expected):
        print(f"== seed {seed}: running {' '.join(argv)}", flush=True)
        ce_lora_quality.main(argv)
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
                "eval_loss": float(r["eval_loss"]), "lora_eval_loss": float(lora["eval_loss"]),
                "loss_gap_pct": 100 * (float(r["eval_loss"]) / float(lora["eval_loss"]) - 1),
                "exact_match_gap_points": 100 * (float(r["exact_match"]) - float(lora["exact_match"])),
            })  # fmt: skip
    return gaps


def t975(df: int) -> float:
    """The two-sided 95% quantile of Student's t with ``df`` degrees of freedom: the table up to 30, then the
    Cornish-Fisher expansion around the normal's 1.95996 (within 1e-4 there; the normal's own 1.96, used before,
    made the interval 1.5% too narrow at 80 seeds and 4% at 32)."""
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))  # fmt: skip


def interval(values: list[float]) -> tuple[float, float, float, float]:
    """(mean, standard deviation, lower, upper) with the two-sided 95% Student-t interval of the mean; the
    deviation and interval are NaN for fewer than two values."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan, math.nan, math.nan
    std = statistics.stdev(values)
    half = t975(len(values) - 1) * std / math.sqrt(len(values))
    return mean, std, mean - half, mean + half


def ratio_of_means(pairs: list[tuple[float, float]], resamples: int = 10_000) -> tuple[float, float, float]:
    """100 * (mean of the first / mean of the second - 1) over ``pairs`` (here CE-LoRA's and LoRA's eval loss per
    seed), with a 95% percentile bootstrap interval that resamples whole seeds (fixed generator: reproducible).

    Unlike the mean of per-seed ratios it is not carried by the seeds where LoRA's loss is near zero."""
    ours, theirs = zip(*pairs)
    point = 100 * (sum(ours) / sum(theirs) - 1)
    rng = random.Random(0)
    draws = sorted(
        100 * (sum(ours[i] for i in idx) / sum(theirs[i] for i in idx) - 1)
        for idx in ([rng.randrange(len(pairs)) for _ in pairs] for _ in range(resamples))
    )
    return point, draws[int(0.025 * resamples)], draws[int(0.975 * resamples) - 1]


def summarize(gaps: list[dict], excluded: dict[int, float], recipe: str) -> str:
    """The markdown summary: per-seed gaps, then per setting the intervals and the criterion verdicts."""
    methods = list(dict.fromkeys(g["method"] for g in gaps))
    seeds = sorted({g["seed"] for g in gaps})
    lines = [
        f"CE-LoRA vs LoRA over {len(seeds)} seeds (`ce_lora_quality.py {recipe}`); gaps against LoRA on the "
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
    limit = CRITERIA[0][3]
    lines += ["", "| setting | mean eval loss against LoRA's | 95% bootstrap interval over seeds | within the limit |",
              "|---" * 4 + "|"]  # fmt: skip
    for m in methods:
        point, low, high = ratio_of_means([(g["eval_loss"], g["lora_eval_loss"]) for g in gaps if g["method"] == m])
        if len(seeds) < 2:  # resampling one seed gives a zero-width interval, which decides nothing
            low = high = math.nan
            verdict = "undecided (one seed)"
        else:
            verdict = f"{'yes' if high <= limit else 'not shown'} (worse end {high:+.2f}%, limit {limit:+g}%)"
        lines.append(f"| {m} | {point:+.2f}% | [{low:+.2f}, {high:+.2f}]% | {verdict} |")
    return "\n".join(lines)


def plot_mean_curves(out: str, seeds: list[int]) -> None:
    """``curves.png``: each method's eval loss per fine-tuning step, averaged over ``seeds`` (left), and that mean
    against LoRA's (right, %), from the seeds' ``curves.csv``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sums: dict[str, dict[int, list[float]]] = {}
    for seed in seeds:
        with open(os.path.join(out, f"seed_{seed}", "curves.csv")) as f:
            for c in csv.DictReader(f):
                if c["kind"] == "eval":
                    sums.setdefault(c["method"], {}).setdefault(int(c["step"]), []).append(float(c["loss"]))
    mean = {m: {step: statistics.fmean(v) for step, v in sorted(by_step.items())} for m, by_step in sums.items()}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for method, curve in mean.items():
        left.plot(list(curve), list(curve.values()), marker="o", markersize=3, label=method)
        if method != "LoRA":
            gap = [100 * (curve[s] / mean["LoRA"][s] - 1) for s in curve]
            right.plot(list(curve), gap, marker="o", markersize=3, label=method)
    left.set(title=f"eval loss, mean over {len(seeds)} seeds", xlabel="fine-tuning step", ylabel="loss", yscale="log")
    right.axhline(0.0, color="gray", linewidth=0.8)
    right.set(title="mean eval loss against LoRA's", xlabel="fine-tuning step", ylabel="%")
    left.legend()
    right.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"), dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    check_folder(args)
    rows, excluded = [], {}
    for seed in args.seeds:
        seed_rows = run_seed(seed, args)
        base = float(seed_rows[0]["base_pretrain_exact_match"])
        if base < args.min_base_exact_match:
            excluded[seed] = base
        else:
            rows += seed_rows
    gaps = paired_gaps(rows) if rows else []
    for stale in ("summary.csv", "curves.png"):  # an earlier sweep's (other seeds), unless rewritten below
        Path(args.out, stale).unlink(missing_ok=True)
    if gaps:
        with open(os.path.join(args.out, "summary.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(gaps[0]))
            writer.writeheader()
            writer.writerows(gaps)
    shared_base = [] if args.base_seed is None else ["--base-seed", str(args.base_seed)]
    recipe = " ".join(["--preset", args.preset, *shared_base, *args.recipe_args])
    table = summarize(gaps, excluded, recipe) if gaps else f"no seed passed pre-training: {excluded}"
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    if gaps:
        try:
            plot_mean_curves(args.out, sorted({g["seed"] for g in gaps}))
        except ImportError:
            print("matplotlib is not installed: curves.png not written")
    return table


if __name__ == "__main__":
    main()
