"""The CE-LoRA quality recipe's CPU preset runs end to end and writes its table, curves and plot."""

from __future__ import annotations

import csv
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "ce_lora_quality.py"


@pytest.fixture
def recipes():
    """The recipe modules, imported from ``recipes/`` (not a package)."""
    sys.path.insert(0, str(RECIPE.parent))
    import ce_lora_quality
    import ce_lora_seeds

    return ce_lora_quality, ce_lora_seeds


def _run_tiny(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(RECIPE), "--tiny", *args], capture_output=True, text=True, env=env, timeout=600
    )


def test_tiny_preset_writes_table_and_plot(tmp_path):
    """A run writes its table and plot; a second one with another fine-tuning seed reads the base model back from
    ``--base-dir`` (same weights: same base accuracy), and one asking for another base model is refused."""
    first = _run_tiny("--output-dir", str(tmp_path / "a"), "--base-dir", str(tmp_path / "base"))
    assert first.returncode == 0, first.stderr[-3000:]
    with open(tmp_path / "a" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["LoRA", "CE-LoRA paper ratios", "CE-LoRA 0.5"]
    for row in rows:
        assert 0.0 < float(row["eval_loss"]) < 10.0 and 0.0 <= float(row["exact_match"]) <= 1.0
    assert (tmp_path / "a" / "loss.png").stat().st_size > 0
    assert "| LoRA |" in (tmp_path / "a" / "results.md").read_text()
    assert (tmp_path / "base" / "model.safetensors").exists() and "base model read" not in first.stdout

    second = _run_tiny("--output-dir", str(tmp_path / "b"), "--base-dir", str(tmp_path / "base"), "--seed", "5",
                       "--base-seed", "0", "--ratios", "0.5")  # fmt: skip
    assert second.returncode == 0, second.stderr[-3000:]
    assert "base model read from" in second.stdout
    with open(tmp_path / "b" / "results.csv") as f:
        again = list(csv.DictReader(f))
    assert [r["method"] for r in again] == ["LoRA", "CE-LoRA 0.5"] and again[0]["seed"] == "5"
    assert again[0]["base_seed"] == "0"
    assert again[0]["base_pretrain_exact_match"] == rows[0]["base_pretrain_exact_match"]

    other = _run_tiny("--output-dir", str(tmp_path / "c"), "--base-dir", str(tmp_path / "base"), "--base-seed", "3")
    assert other.returncode != 0 and "'base_seed': (0, 3)" in other.stderr


def _fake_recipe(calls: list[int], table: dict[int, dict[str, tuple[float, float]]], base: dict[int, float]):
    """A stand-in for ce_lora_quality.main that writes a results.csv of given (eval loss, exact match) per method,
    and a curves.csv whose eval loss falls to it."""

    def main(argv):
        seed, out = int(argv[argv.index("--seed") + 1]), argv[argv.index("--output-dir") + 1]
        calls.append(seed)
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "results.csv"), "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["method", "eval_loss", "exact_match", "seed", "base_pretrain_exact_match"])
            for method, (loss, em) in table[seed].items():
                writer.writerow([method, loss, em, seed, base[seed]])
        with open(os.path.join(out, "curves.csv"), "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["method", "step", "kind", "loss"])
            for method, (loss, _) in table[seed].items():
                writer.writerows([[method, 10, "eval", 2 * loss], [method, 10, "train", 3 * loss],
                                  [method, 20, "eval", loss]])  # fmt: skip

    return main


def test_seeds_summary_pairs_each_seed_with_lora(tmp_path, monkeypatch, recipes):
    """Paired gaps per seed, the mean and its Student-t interval by hand, a seed whose pre-training failed left out,
    and a second run reusing the finished seeds."""
    ce_lora_quality, ce_lora_seeds = recipes

    methods = ("LoRA", "CE-LoRA paper ratios", "CE-LoRA 0.5")
    table = {
        1: dict(zip(methods, [(0.20, 0.50), (0.19, 0.52), (0.22, 0.47)])),
        2: dict(zip(methods, [(0.40, 0.30), (0.42, 0.30), (0.40, 0.31)])),
        3: dict(zip(methods, [(0.10, 0.80), (0.10, 0.79), (0.12, 0.80)])),
        4: dict(zip(methods, [(2.00, 0.00), (1.00, 0.00), (9.00, 0.00)])),
    }
    calls: list[int] = []
    monkeypatch.setattr(ce_lora_quality, "main", _fake_recipe(calls, table, {1: 0.9, 2: 0.8, 3: 0.95, 4: 0.05}))
    text = ce_lora_seeds.main(["--seeds", "1", "2", "3", "4", "--output-dir", str(tmp_path)])
    assert calls == [1, 2, 3, 4]
    assert "Left out" in text and "4 (5.0%)" in text
    with open(tmp_path / "summary.csv") as f:
        gaps = list(csv.DictReader(f))
    assert {int(g["seed"]) for g in gaps} == {1, 2, 3}
    paper = [float(g["loss_gap_pct"]) for g in gaps if g["method"] == "CE-LoRA paper ratios"]
    expected = [100 * (0.19 / 0.20 - 1), 100 * (0.42 / 0.40 - 1), 0.0]
    assert all(abs(a - b) < 1e-9 for a, b in zip(paper, expected))
    mean, std, low, high = ce_lora_seeds.interval(expected)
    half = 4.303 * statistics.stdev(expected) / math.sqrt(3)  # t(0.975, 2 degrees of freedom)
    assert abs(mean - statistics.fmean(expected)) < 1e-12 and abs(high - mean - half) < 1e-9
    assert f"[{low:+.2f}, {high:+.2f}]" in text
    assert (tmp_path / "curves.png").stat().st_size > 0
    ce_lora_seeds.main(["--seeds", "1", "2", "3", "4", "--output-dir", str(tmp_path)])
    assert calls == [1, 2, 3, 4], "finished seeds are read back, not run again"
    with pytest.raises(SystemExit, match="another sweep"):
        ce_lora_seeds.main(["--seeds", "1", "--base-seed", "7", "--output-dir", str(tmp_path)])
    # a folder without runs takes a new sweep's settings; settings the recipe refuses write nothing
    fresh = tmp_path / "fresh"
    with pytest.raises(SystemExit):
        ce_lora_seeds.main(["--seeds", "1", "--output-dir", str(fresh), "--", "--lr", "0"])
    assert not fresh.exists()


def test_seeds_share_one_base_model(tmp_path, monkeypatch, recipes):
    """``--base-seed`` hands every run the same base seed and folder, and the arguments after ``--`` reach the
    recipe (here ``--ratios 0.5``: one CE-LoRA row per seed is then a complete run)."""
    ce_lora_quality, ce_lora_seeds = recipes

    argvs: list[list[str]] = []
    fake = _fake_recipe([], {s: {"LoRA": (0.2, 0.5), "CE-LoRA 0.5": (0.21, 0.5)} for s in (1, 2)}, {1: 0.9, 2: 0.9})
    monkeypatch.setattr(ce_lora_quality, "main", lambda argv: (argvs.append(argv), fake(argv)))
    argv = ["--seeds", "1", "2", "--base-seed", "9", "--output-dir", str(tmp_path), "--", "--ratios", "0.5"]
    text = ce_lora_seeds.main(argv)
    base = ["--base-seed", "9", "--base-dir", str(tmp_path / "base")]
    assert [a[a.index("--seed") + 1] for a in argvs] == ["1", "2"]
    assert all(a[-6:] == [*base, "--ratios", "0.5"] for a in argvs), argvs
    assert "--preset cpu_unsaturated --base-seed 9 --ratios 0.5" in text
    ce_lora_seeds.main(argv)
    assert len(argvs) == 2, "finished seeds are read back, not run again"
    with pytest.raises(SystemExit):  # the sweep owns each run's seed and folder
        ce_lora_seeds.parse_args(["--seeds", "1", "--", "--output-dir=elsewhere"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--finetune-steps", "-1"], "argument --finetune-steps: must be >= 1, got -1"),
        (["--pairs", "0"], "argument --pairs: must be >= 1, got 0"),
        (["--lr", "0"], "argument --lr: must be a finite number > 0, got 0"),
        (["--ratios", "abc"], "--ratios: 'abc' is neither 'paper' nor a number in (0, 1]"),
        (["--see", "5"], "unrecognized arguments: --see 5"),  # no abbreviation slips past the seeds sweep's guard
        (["--ratios", "0.5", "0.50"], "--ratios has repeats: 0.5 0.50"),  # was one method trained twice
        (["--ratios", "paper", "paper"], "--ratios has repeats: paper paper"),
    ],
)
def test_quality_recipe_refuses_bad_options(args, message, recipes, capsys):
    ce_lora_quality, _ = recipes
    with pytest.raises(SystemExit):
        ce_lora_quality.parse_args(["--tiny", *args])
    assert message in capsys.readouterr().err


def test_ratio_of_means_and_its_bootstrap(recipes):
    """The point estimate by hand; identical pairs give a zero-width interval; the interval holds the point."""
    ce_lora_seeds = recipes[1]

    pairs = [(0.30, 0.20), (0.10, 0.20), (1.00, 0.90), (0.50, 0.40)]
    point, low, high = ce_lora_seeds.ratio_of_means(pairs, resamples=2000)
    assert abs(point - 100 * (1.9 / 1.7 - 1)) < 1e-9 and low <= point <= high and low < high
    assert ce_lora_seeds.ratio_of_means([(0.3, 0.2)] * 5, resamples=100)[1:] == pytest.approx((50.0, 50.0))


def test_quality_recipe_refuses_bad_settings_and_evaluates_every_example(recipes, tmp_path, capsys):
    """Settings that failed after the pre-training (or in it) are argparse errors naming the value; the eval batch
    divides the eval set (training drops incomplete batches, evaluation must not)."""
    ce_lora_quality, _ = recipes
    for extra, message in [
        (["--heads", "3"], "not a multiple of the number of attention heads (3)"),
        (["--kv-heads", "3"], "--heads 4 must be a multiple of --kv-heads 3"),
        (["--train-size", "16"], "--train-size 16 is smaller than --batch 32"),
        (["--seed", "-1"], "must be in [0, 2**32), got -1"),
        (["--replot", "--output-dir", str(tmp_path / "none")], "curves.csv does not exist"),
    ]:
        with pytest.raises(SystemExit):
            ce_lora_quality.parse_args(["--tiny", *extra])
        assert message in capsys.readouterr().err, extra
    args = ce_lora_quality.parse_args(["--tiny", "--eval-size", "48", "--output-dir", str(tmp_path)])
    eval_batch = ce_lora_quality.training_args(args, str(tmp_path), 1, 1e-3, True, 0).per_device_eval_batch_size
    assert args.eval_size % eval_batch == 0 and eval_batch == 24


def test_seeds_sweep_one_seed_decides_nothing_and_replot_is_refused(tmp_path, recipes, capsys):
    """With one seed the bootstrap over seeds has zero width: its verdict is undecided, as the t-interval's (it said
    'yes'). ``--replot`` after ``--`` would redraw a plot instead of running the recipe, and is refused by name even
    where the seed's folder holds a curves.csv (the recipe's own check passes there)."""
    _, ce_lora_seeds = recipes
    gaps = ce_lora_seeds.paired_gaps([
        {"seed": "1", "method": "LoRA", "eval_loss": "0.20", "exact_match": "0.5"},
        {"seed": "1", "method": "CE-LoRA 0.5", "eval_loss": "0.201", "exact_match": "0.5"},
    ])  # fmt: skip
    text = ce_lora_seeds.summarize(gaps, {}, "--preset tiny")
    assert "yes" not in text and text.count("undecided (one seed)") == 3, text
    (tmp_path / "seed_1").mkdir()
    (tmp_path / "seed_1" / "curves.csv").write_text("method,step,kind,loss\n")
    with pytest.raises(SystemExit):
        ce_lora_seeds.parse_args(["--seeds", "1", "--output-dir", str(tmp_path), "--", "--replot"])
    assert "the sweep owns --replot" in capsys.readouterr().err


def test_seeds_sweep_removes_outputs_it_does_not_rewrite(tmp_path, monkeypatch, recipes):
    """A sweep in a folder holding an earlier sweep's summary.csv and curves.png (other seeds) removes those it does
    not write: curves.png without matplotlib, summary.csv when no seed passed pre-training."""
    ce_lora_quality, ce_lora_seeds = recipes
    table = {s: {"LoRA": (0.2, 0.5), "CE-LoRA 0.5": (0.21, 0.5)} for s in (1, 2, 3)}
    monkeypatch.setattr(ce_lora_quality, "main", _fake_recipe([], table, {1: 0.9, 2: 0.9, 3: 0.0}))
    common = ["--output-dir", str(tmp_path), "--", "--ratios", "0.5"]
    ce_lora_seeds.main(["--seeds", "1", "2", *common])
    assert (tmp_path / "curves.png").exists() and (tmp_path / "summary.csv").exists()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # its import now raises ImportError
    ce_lora_seeds.main(["--seeds", "1", *common])
    assert not (tmp_path / "curves.png").exists()
    with open(tmp_path / "summary.csv") as f:
        assert {row["seed"] for row in csv.DictReader(f)} == {"1"}
    assert "no seed passed" in ce_lora_seeds.main(["--seeds", "3", *common])
    assert not (tmp_path / "summary.csv").exists()


def test_quality_recipe_without_matplotlib_removes_an_earlier_plot(tmp_path, monkeypatch, recipes):
    """A run without matplotlib in a folder where an earlier run drew loss.png removes it (it showed the earlier
    run's curves beside this run's curves.csv); ``--replot`` then says matplotlib is needed instead of a traceback."""
    ce_lora_quality, _ = recipes
    argv = ["--tiny", "--ratios", "0.5", "--pretrain-steps", "1", "--finetune-steps", "2", "--eval-every", "2",
            "--train-size", "64", "--eval-size", "32", "--output-dir", str(tmp_path)]  # fmt: skip
    ce_lora_quality.main(argv)
    assert (tmp_path / "loss.png").stat().st_size > 0
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # its import now raises ImportError
    ce_lora_quality.main(argv)
    assert not (tmp_path / "loss.png").exists() and (tmp_path / "curves.csv").exists()
    with pytest.raises(SystemExit, match="--replot needs matplotlib"):
        ce_lora_quality.main([*argv, "--replot"])


def test_the_default_preset_follows_the_machine(recipes, monkeypatch):
    """Without --preset: the gpu preset only where CUDA is (on CPU it takes hours), cpu_unsaturated elsewhere."""
    import torch

    ce_lora_quality, _ = recipes
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ce_lora_quality.parse_args([]).preset == "cpu_unsaturated"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert ce_lora_quality.parse_args([]).preset == "gpu"
    assert ce_lora_quality.parse_args(["--preset", "tiny"]).preset == "tiny"


def test_a_base_dir_holding_another_model_is_refused_not_overwritten(recipes, tmp_path, capsys):
    """``--base-dir`` pointing at a folder with a model the recipe did not save (no base_settings.json) is refused
    before any work: the recipe used to pre-train its own base model and write it over that folder's files. An
    empty folder, or one the recipe filled, is accepted."""
    ce_lora_quality, _ = recipes
    theirs = tmp_path / "my_llama"
    theirs.mkdir()
    (theirs / "model.safetensors").write_bytes(b"someone's weights")
    with pytest.raises(SystemExit):
        ce_lora_quality.parse_args(["--tiny", "--output-dir", str(tmp_path / "out"), "--base-dir", str(theirs)])
    assert f"--base-dir {str(theirs)!r} holds files but no base_settings.json" in capsys.readouterr().err
    assert (theirs / "model.safetensors").read_bytes() == b"someone's weights"
    (tmp_path / "empty").mkdir()
    ce_lora_quality.parse_args(["--tiny", "--base-dir", str(tmp_path / "empty")])
    (theirs / "base_settings.json").write_text("{}")
    ce_lora_quality.parse_args(["--tiny", "--base-dir", str(theirs)])


def test_seeds_sweep_refuses_an_output_path_that_is_a_file(tmp_path, recipes, capsys):
    """The sweep's own folder is checked like the recipe's (it raised FileExistsError from os.makedirs)."""
    _, ce_lora_seeds = recipes
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit):
        ce_lora_seeds.parse_args(["--seeds", "1", "--output-dir", str(tmp_path / "afile")])
    assert "exists and is not a folder" in capsys.readouterr().err


def test_seed_intervals_beyond_30_seeds_use_students_t_not_the_normal(recipes):
    """Past the table's 30 degrees of freedom the interval used the normal's 1.96: at the README's 80 seeds it was
    1.5% too narrow (t(0.975, 79) = 1.9905). Reference quantiles from statistical tables."""
    ce_lora_seeds = recipes[1]
    for df, quantile in [(30, 2.042), (31, 2.0395), (40, 2.0211), (79, 1.9905), (120, 1.9799)]:
        assert ce_lora_seeds.t975(df) == pytest.approx(quantile, abs=2e-4), df
    values = [float(i % 7) for i in range(80)]
    mean, std, low, high = ce_lora_seeds.interval(values)
    assert high - mean == pytest.approx(1.9905 * std / math.sqrt(80), rel=1e-4)
