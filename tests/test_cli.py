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
    """A negative seed (numpy refused it after setup), a model the config refuses, an output path that is a file, a
    block length or rate that cannot train and a block size the residual ignores end in argparse errors naming the
    value, before any data is read."""
    import pytest

    from kimi_hf.cli import main

    a_file = tmp_path / "file"
    a_file.write_text("x")
    for argv, message in [
        (["demo", "--seed", "-1"], "--seed: must be in [0, 2**32), got -1"),
        (["demo", "--residual", "block", "--attn-res-block-size", "9"], "attn_res_block_size must be an integer"),
        (["demo", "--output-dir", str(a_file)], "exists and is not a folder"),
        # a one-token block has no next token: it trained on nothing (loss 0.0, eval loss NaN) and exited 0
        (["demo", "--seq-len", "1"], "--seq-len: must be >= 2"),
        (["demo", "--learning-rate", "inf"], "--learning-rate: must be a finite number > 0, got inf"),
        # it was ignored without a word
        (["demo", "--attn-res-block-size", "4"], "--attn-res-block-size applies to --residual block only"),
        (["demo", "--residual", "full", "--attn-res-block-size", "4"], "not --residual full"),
    ]:
        with pytest.raises(SystemExit):
            main(argv)
        assert message in capsys.readouterr().err


def test_remote_code_failure_reports_the_childs_error(tmp_path):
    """The remote-code reload runs in a child interpreter; when it fails, the demo ends with the child's own error
    (it used to raise CalledProcessError naming only the exit status and a page of generated code)."""
    import pytest
    import torch

    from kimi_hf.cli import remote_code_logits

    ids = torch.ones(1, 3, dtype=torch.long)
    with pytest.raises(SystemExit) as info:
        remote_code_logits(tmp_path, ids, torch.ones_like(ids), tmp_path / "logits.pt")  # an empty folder: no model
    message = str(info.value)
    assert "through remote code failed" in message and "config.json" in message, message
    assert "torch.tensor" not in message  # the error, not the generated code


def test_a_seq_len_longer_than_the_corpus_is_refused_by_name():
    """A --seq-len that leaves fewer than two blocks (one to train on, one held out) is an error naming it, not the
    Trainer's 'num_samples should be a positive integer value' after the model was built."""
    import pytest

    from kimi_hf.cli import _lm_datasets
    from kimi_hf.data import ByteTokenizer

    with pytest.raises(SystemExit, match=r"--seq-len 10000000: the corpus makes [01] blocks"):
        _lm_datasets(ByteTokenizer(), 10_000_000)


def test_a_diverged_demo_fails_its_checks():
    """NaN losses and logits fail the demo's checks: they compared NaN with ``>``, so a diverged run (``--learning-rate
    1e30``) printed NaN everywhere and exited 0."""
    import pytest

    from kimi_hf.cli import check_summary

    good = {"train_loss": 2.5, "eval_loss": 2.4, "cached_generation_equals_recomputation": True,
            "reload_rel_diff": 0.0, "remote_code_rel_diff": 0.0}  # fmt: skip
    check_summary(good)
    nan = float("nan")
    with pytest.raises(SystemExit, match="training diverged: train loss 2.5, eval loss nan"):
        check_summary({**good, "eval_loss": nan})
    with pytest.raises(SystemExit, match="logits differ .* nan through remote code"):
        check_summary({**good, "reload_rel_diff": nan, "remote_code_rel_diff": nan})
