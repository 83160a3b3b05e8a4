"""The AttnRes replication recipe: its tiny preset end to end (with and without matplotlib) and its refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "attn_res_replication.py"


def _recipe():
    """The recipe module, imported from ``recipes/`` (not a package)."""
    sys.path.insert(0, str(RECIPE.parent))
    try:
        import attn_res_replication
    finally:
        sys.path.pop(0)
    return attn_res_replication


def _run_tiny(out: Path, pythonpath: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    env |= {"OMP_NUM_THREADS": "1"} | ({"PYTHONPATH": pythonpath} if pythonpath else {})
    return subprocess.run([sys.executable, str(RECIPE), "--tiny", "--modes", "standard", "block", "--output-dir",
                           str(out)], capture_output=True, text=True, env=env, timeout=600)  # fmt: skip


def test_tiny_preset_writes_every_output_and_skips_the_plot_without_matplotlib(tmp_path):
    done = _run_tiny(tmp_path / "with")
    assert done.returncode == 0, done.stderr[-3000:]
    files = {p.name for p in (tmp_path / "with").iterdir()}
    assert files == {f"attn_res_replication.{ext}" for ext in ("csv", "json", "md", "png")}
    losses = json.loads((tmp_path / "with" / "attn_res_replication.json").read_text())["final_val_loss"]
    assert set(losses) == {"standard", "block"} and all(0 < v < 10 for v in losses.values())

    stub = tmp_path / "stub" / "matplotlib"  # an installation without matplotlib (not a core dependency)
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('no matplotlib here')\n")
    done = _run_tiny(tmp_path / "without", pythonpath=str(tmp_path / "stub"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "matplotlib is not installed" in done.stdout
    files = {p.name for p in (tmp_path / "without").iterdir()}
    assert files == {f"attn_res_replication.{ext}" for ext in ("csv", "json", "md")}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--steps", "0"], "argument --steps: must be >= 1, got 0"),
        (["--eval-every", "0"], "argument --eval-every: must be >= 1, got 0"),
        (["--seq", "-4"], "argument --seq: must be >= 2 (the next-token loss needs two tokens), got -4"),
        (["--lr", "0"], "argument --lr: must be a finite number > 0, got 0"),
        (["--budget-s", "-1"], "argument --budget-s: must be >= 0, got -1"),
        (["--docs", "1"], "--docs must be >= 2"),
        (["--layers", "1", "--block-size", "3"], "--block-size 3 exceeds the 2 sublayers of --layers 1"),
        (["--heads", "3"], "head_dim must be even for RoPE, got 21"),
        (["--device", "foo"], "--device 'foo'"),
        (["--device", "meta"], "--device 'meta': expected cpu, cuda or cuda:N"),  # was autocast's error after setup
        (["--modes", "block", "block"], "--modes has repeats: block block"),  # was trained twice into one table
        (["--seed", "-1"], "argument --seed: must be in [0, 2**32), got -1"),
        (["--seq", "1"], "argument --seq: must be >= 2"),  # trained on no target: every loss NaN
        (["--steps", "10", "--warmup", "20"], "--warmup 20 exceeds --steps 10"),  # never reached --lr
    ],
)
def test_bad_sizes_are_refused_before_any_work(args, message, capsys):
    with pytest.raises(SystemExit):
        _recipe().parse_args(["--tiny", *args])
    assert message in capsys.readouterr().err


def test_an_output_path_that_is_a_file_is_refused_before_training(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit):
        _recipe().parse_args(["--tiny", "--output-dir", str(tmp_path / "afile")])
    assert "exists and is not a folder" in capsys.readouterr().err


def test_a_corpus_split_too_small_for_one_block_is_an_error_naming_the_options(tmp_path):
    """Validation documents too short for one block of --seq end in an error naming --seq and --docs (was a
    ValueError traceback from the data module)."""
    with pytest.raises(SystemExit, match=r"--seq 4096 --docs 2: corpus split too small for one block of 4096"):
        _recipe().main(["--tiny", "--docs", "2", "--seq", "4096", "--output-dir", str(tmp_path)])


def test_a_rerun_without_matplotlib_removes_the_earlier_plot(tmp_path, monkeypatch):
    """Outputs rewritten without matplotlib drop the .png of an earlier run in that folder, which would otherwise
    show other curves (other modes, other steps) beside the new .csv."""
    recipe = _recipe()
    args = recipe.parse_args(["--tiny", "--modes", "standard", "--output-dir", str(tmp_path)])
    rows = [dict(mode="standard", step=s, train_loss=3.0, val_loss=3.0 - s / 100, params=10, elapsed_s=s / 10)
            for s in (10, 20)]  # fmt: skip
    recipe.write_outputs(rows, args, recipe.torch.device("cpu"))
    png = tmp_path / "attn_res_replication.png"
    assert png.stat().st_size > 0
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # its import now raises ImportError
    recipe.write_outputs(rows[:1], args, recipe.torch.device("cpu"))
    assert not png.exists()
    assert json.loads((tmp_path / "attn_res_replication.json").read_text())["rows"] == rows[:1]


def test_a_budget_too_small_for_the_evaluations_names_the_option_and_its_value():
    """The error used to read "budget 0 s leaves -3 steps" for ``--budget-s 0.01``: no option, a rounded value."""
    recipe = _recipe()
    args = recipe.parse_args(["--tiny", "--budget-s", "0.01"])
    with pytest.raises(SystemExit, match=r"--budget-s 0.01 leaves -?\d+ steps \(fewer than the 3 evaluations\)"):
        recipe.fit_budget(args, {"standard": 0.01, "block": 0.01})
