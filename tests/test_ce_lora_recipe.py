"""The CE-LoRA quality recipe's CPU preset runs end to end and writes its table, curves and plot."""

from __future__ import annotations

import csv
import os
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
