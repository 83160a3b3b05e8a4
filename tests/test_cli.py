"""``kimi-hf demo`` (the README's main job) end to end at its smallest: train, evaluate, generate, save, reload."""

from __future__ import annotations

import math
import os

from kimi_hf.cli import build_parser, run_demo


def test_tiny_demo_trains_generates_saves_and_reloads(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the demo's own subprocess loads remote code
    args = build_parser().parse_args(
        ["demo", "--output-dir", str(tmp_path), "--steps", "3", "--batch-size", "2", "--seq-len", "32",
         "--hidden-size", "32", "--layers", "2", "--eval-blocks", "2", "--new-tokens", "3", "--residual", "block"]
    )  # fmt: skip
    summary = run_demo(args)
    assert math.isfinite(summary["train_loss"]) and math.isfinite(summary["eval_loss"])
    assert summary["cached_generation_equals_recomputation"]
    assert summary["reload_rel_diff"] <= 1e-5 and summary["remote_code_rel_diff"] <= 1e-5
    files = set(summary["files"])
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    assert {"modeling_kimi_linear.py", "config.json", "tokenizer_config.json", "data.py"} <= files
    assert os.path.isdir(summary["saved_to"])


def test_demo_refuses_bad_settings_before_any_work(tmp_path, capsys):
    """A negative seed (numpy refused it after setup), a model the config refuses and an output path that is a file
    end in argparse errors naming the value, before any data is read."""
    import pytest

    from kimi_hf.cli import main

    a_file = tmp_path / "file"
    a_file.write_text("x")
    for argv, message in [
        (["demo", "--seed", "-1"], "--seed: must be in [0, 2**32), got -1"),
        (["demo", "--residual", "block", "--attn-res-block-size", "9"], "attn_res_block_size must be an integer"),
        (["demo", "--output-dir", str(a_file)], "exists and is not a folder"),
    ]:
        with pytest.raises(SystemExit):
            main(argv)
        assert message in capsys.readouterr().err
