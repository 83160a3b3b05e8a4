"""The CE-LoRA quality recipe's CPU preset runs end to end and writes its table, curves and plot."""

from __future__ import annotations

import csv
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "ce_lora_quality.py"


def test_tiny_preset_writes_table_and_plot(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(RECIPE), "--tiny", "--output-dir", str(tmp_path)], check=True, env=env)
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["LoRA", "CE-LoRA paper ratios", "CE-LoRA 0.5"]
    for row in rows:
        assert 0.0 < float(row["eval_loss"]) < 10.0 and 0.0 <= float(row["exact_match"]) <= 1.0
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert "| LoRA |" in (tmp_path / "results.md").read_text()


def _fake_recipe(calls: list[int], table: dict[int, dict[str, tuple[float, float]]], base: dict[int, float]):
    """A stand-in for ce_lora_quality.main that writes a results.csv of given (eval loss, exact match) per method."""

    def main(argv):
        seed, out = int(argv[argv.index("--seed") + 1]), argv[argv.index("--output-dir") + 1]
        calls.append(seed)
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "results.csv"), "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["method", "eval_loss", "exact_match", "seed", "base_pretrain_exact_match"])
            for method, (loss, em) in table[seed].items():
                writer.writerow([method, loss, em, seed, base[seed]])

    return main


def test_seeds_summary_pairs_each_seed_with_lora(tmp_path, monkeypatch):
    """Paired gaps per seed, the mean and its Student-t interval by hand, a seed whose pre-training failed left out,
    and a second run reusing the finished seeds."""
    sys.path.insert(0, str(RECIPE.parent))
    import ce_lora_quality
    import ce_lora_seeds

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
    ce_lora_seeds.main(["--seeds", "1", "2", "3", "4", "--output-dir", str(tmp_path)])
    assert calls == [1, 2, 3, 4], "finished seeds are read back, not run again"
