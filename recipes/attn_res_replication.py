"""Replicate the Attention Residuals comparison (arXiv 2603.15031) at small scale.

Trains a Llama-style decoder from scratch three times, with the standard residual, Block AttnRes and Full
AttnRes, on the same data in the same order with the same seed and steps, and evaluates the validation loss
on held-out documents periodically. Writes the curves (CSV, JSON), a PNG plot and a markdown table into
``--output-dir``, rewritten after each model so that a run cut short keeps the models it finished.

Data never leaves the machine: a synthetic grammar language (default) or the Python standard library's
docstrings, byte-level tokenised (``recipes/data.py``).

With ``--budget-s`` (the gpu preset sets it) a few calibration steps of every mode (which also compile the
kernels) time the step; the step count, the same for every mode, is then lowered so that all the training
and evaluation fits in the budget.

  python recipes/attn_res_replication.py --tiny          # seconds on a CPU (smoke test)
  python recipes/attn_res_replication.py                 # CPU-small (0.8M parameters)
  python recipes/attn_res_replication.py --preset gpu --output-dir out   # 25M parameters, ~2.5 min on an H200
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # recipes/data.py, without the repo root
from data import CORPORA, token_splits  # noqa: E402

from kimi_hf.cli import (  # noqa: E402
    check_output_dir,
    non_negative_float,
    positive_float,
    positive_int,
    seed_int,
    seq_len_int,
)
from kimi_hf.models.attn_res import AttnResConfig, AttnResForCausalLM  # noqa: E402

PRESETS = {
    "tiny": dict(hidden=64, layers=2, heads=4, intermediate=128, seq=64, batch=8, steps=30, eval_every=10,
                 eval_batches=4, lr=3e-3, warmup=5, block_size=2, docs=4000, budget_s=0.0),
    "cpu": dict(hidden=128, layers=4, heads=4, intermediate=320, seq=128, batch=16, steps=300, eval_every=50,
                eval_batches=8, lr=2e-3, warmup=30, block_size=4, docs=4000, budget_s=0.0),
    # 25.7M parameters, 16 sublayers in 8 blocks of 2 (the paper's N ~ 8); 16K tokens per step, bf16 autocast.
    "gpu": dict(hidden=512, layers=8, heads=8, intermediate=1408, seq=512, batch=32, steps=2000, eval_every=200,
                eval_batches=16, lr=1.5e-3, warmup=100, block_size=2, docs=40000, budget_s=90.0),
}  # fmt: skip
CALIBRATION_STEPS = (3, 5)  # untimed (compilation), timed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--tiny", action="store_true", help="shorthand for --preset tiny")
    p.add_argument("--modes", nargs="+", default=["standard", "block", "full"], choices=("standard", "block", "full"))
    p.add_argument("--corpus", choices=CORPORA, default="grammar", help="--docs sets the grammar corpus' size")
    p.add_argument("--output-dir", "--out", dest="out", default="attn_res_replication", help="output folder")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    for name in PRESETS["cpu"]:
        # --seq 1 would leave no next-token target: the loss came out NaN after all the training
        kind = {"lr": positive_float, "budget_s": non_negative_float, "seq": seq_len_int}.get(name, positive_int)
        extra = " (seconds of training + evaluation of all modes; 0: none)" if name == "budget_s" else ""
        flag = f"--{name.replace('_', '-')}"
        p.add_argument(flag, type=kind, default=None, help=f"override the preset's {name}{extra}")
    args = p.parse_args(argv)
    if args.tiny:
        args.preset = "tiny"
    for name, value in PRESETS[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.block_size > 2 * args.layers:
        p.error(f"--block-size {args.block_size} exceeds the {2 * args.layers} sublayers of --layers {args.layers}")
    if args.warmup > args.steps:  # the learning rate would never reach --lr (and the cosine never start)
        p.error(f"--warmup {args.warmup} exceeds --steps {args.steps}")
    if args.docs < 2:
        p.error(f"--docs must be >= 2 (training and validation documents), got {args.docs}")
    if len(set(args.modes)) != len(args.modes):  # a repeat would train that mode twice into the same rows
        p.error(f"--modes has repeats: {' '.join(args.modes)}")
    check_output_dir(p, args.out)
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as exc:
        p.error(f"--device {args.device!r}: {exc}")
    if device.type not in ("cpu", "cuda"):  # it trains in fp32 on CPU or with bf16 autocast on CUDA, nowhere else
        p.error(f"--device {args.device!r}: expected cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device!r}: no CUDA GPU here")
    for mode in args.modes:  # the model's settings, checked before the corpus is built (e.g. --hidden / --heads)
        try:
            model_config(args, mode, vocab_size=3)
        except ValueError as exc:
            p.error(f"--hidden/--heads/--layers/--block-size: {exc}")
    return args



def model_config(args: argparse.Namespace, mode: str, vocab_size: int) -> AttnResConfig:
    return AttnResConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        max_position_embeddings=args.seq,
        residual=mode,
        attn_res_block_size=args.block_size,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="sdpa",
    )


def build_model(args: argparse.Namespace, mode: str, vocab_size: int) -> AttnResForCausalLM:
    config = model_config(args, mode, vocab_size)
    torch.manual_seed(args.seed)
    return AttnResForCausalLM(config)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: not on norms, embeddings' bias-like vectors or the AttnRes pseudo-queries."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (decay if param.dim() >= 2 and "attn_res" not in name else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _autocast(device: torch.device):
    """bf16 autocast on CUDA (fp32 master weights), plain fp32 elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def evaluate(model, val: torch.Tensor, args, device) -> float:
    model.eval()
    total, count = 0.0, 0
    for start in range(0, min(len(val), args.eval_batches * args.batch), args.batch):
        x = val[start : start + args.batch].to(device)
        with _autocast(device):
            loss = model(x, labels=x).loss
        total += loss.item() * x.numel()
        count += x.numel()
    model.train()
    return total / count


def _setup(args, mode: str, vocab_size: int, device):
    model = build_model(args, mode, vocab_size).to(device)
    opt = torch.optim.AdamW(_param_groups(model, 0.1), lr=args.lr, betas=(0.9, 0.95))
    return model, opt


def _train_step(model, opt, x: torch.Tensor, device) -> torch.Tensor:
    with _autocast(device):
        loss = model(x, labels=x).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def calibrate(args, train: torch.Tensor, vocab_size: int, device) -> dict[str, float]:
    """Seconds per training step of every mode, after untimed steps that compile the kernels (throwaway models)."""
    untimed, timed = CALIBRATION_STEPS
    seconds = {}
    for mode in args.modes:
        model, opt = _setup(args, mode, vocab_size, device)
        batches = torch.randint(len(train), (untimed + timed, args.batch), generator=torch.Generator().manual_seed(1))
        for i, idx in enumerate(batches):
            if i == untimed:
                _sync(device)
                start = time.perf_counter()
            _train_step(model, opt, train[idx].to(device), device)
        _sync(device)
        seconds[mode] = (time.perf_counter() - start) / timed
        print(f"calibration: {mode} {seconds[mode] * 1e3:.1f} ms/step", flush=True)
        del model, opt
    return seconds


def fit_budget(args, seconds: dict[str, float]) -> None:
    """Lower ``args.steps`` (same for every mode) so that training + evaluation of all modes fits ``budget_s``.

    An evaluation batch is costed at a third of a training step (forward only); the number of evaluations
    (steps / eval_every of the preset) is kept, and so is the warm-up fraction of the schedule.
    """
    evals = max(1, args.steps // args.eval_every)
    step_s = sum(seconds.values())
    eval_s = evals * args.eval_batches * step_s / 3
    steps = int((args.budget_s - eval_s) / step_s)
    if steps < evals:
        raise SystemExit(f"attn_res_replication.py: error: --budget-s {args.budget_s:g} leaves {steps} steps (fewer "
                         f"than the {evals} evaluations) at {step_s:.3f} s per step of all modes: raise it")
    if steps < args.steps:
        args.warmup = max(1, args.warmup * steps // args.steps)
        args.steps = steps
        args.eval_every = max(1, steps // evals)
    print(f"budget {args.budget_s:.0f} s: {args.steps} steps per mode, evaluation every {args.eval_every}", flush=True)


def train_one(mode: str, args, train: torch.Tensor, val: torch.Tensor, vocab_size: int, device) -> list[dict]:
    model, opt = _setup(args, mode, vocab_size, device)
    n_params = sum(p.numel() for p in model.parameters())

    def lr_factor(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    order = torch.Generator().manual_seed(args.seed)  # the same batches, in the same order, for every mode
    rows, start = [], time.perf_counter()
    print(f"{mode}: {n_params / 1e6:.2f}M parameters, {args.steps} steps", flush=True)
    model.train()
    for step in range(1, args.steps + 1):
        x = train[torch.randint(len(train), (args.batch,), generator=order)].to(device)
        loss = _train_step(model, opt, x, device)
        sched.step()
        if step % args.eval_every == 0 or step == args.steps:
            val_loss = evaluate(model, val, args, device)
            elapsed = time.perf_counter() - start
            rows.append(dict(mode=mode, step=step, train_loss=loss.item(), val_loss=val_loss,
                             params=n_params, elapsed_s=elapsed))  # fmt: skip
            print(f"  {mode:>8} step {step:>5}/{args.steps}  train {loss.item():.4f}  val {val_loss:.4f}  "
                  f"{elapsed:.1f} s", flush=True)  # fmt: skip
    return rows


def plot_curves(rows: list[dict], modes: list[str], path: str, title: str) -> None:
    """The validation-loss curve of each mode, as a PNG at ``path`` (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in modes:
        curve = [r for r in rows if r["mode"] == mode]
        ax.plot([r["step"] for r in curve], [r["val_loss"] for r in curve], marker="o", label=mode)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(rows: list[dict], args, device: torch.device) -> str:
    """CSV and JSON of the curves, the PNG plot and the markdown table of the modes trained so far."""
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "attn_res_replication")
    with open(path + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    modes = [m for m in args.modes if any(r["mode"] == m for r in rows)]
    try:
        plot_curves(rows, modes, path + ".png", f"AttnRes replication ({args.corpus}, preset {args.preset})")
    except ImportError:
        Path(path + ".png").unlink(missing_ok=True)  # an earlier run's plot would sit beside these curves
        print("matplotlib is not installed: the .png plot is not written (the .csv holds its curves)")

    finals = {m: [r for r in rows if r["mode"] == m][-1] for m in modes}
    base = finals.get("standard")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    setup = (
        f"corpus {args.corpus}, preset {args.preset}, {args.steps} steps of {args.batch}x{args.seq} tokens, "
        f"d {args.hidden}, {args.layers} layers ({2 * args.layers} sublayers), block size {args.block_size}, "
        f"lr {args.lr}, seed {args.seed}; {device_name}, {precision}, torch {torch.__version__}"
    )
    lines = [
        f"AttnRes replication: {setup}",
        "",
        "| residual | params | final val loss | best val loss | vs standard | s/step (with evaluation) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for mode, last in finals.items():
        best = min(r["val_loss"] for r in rows if r["mode"] == mode)
        delta = f"{last['val_loss'] - base['val_loss']:+.4f}" if base else "-"
        lines.append(
            f"| {mode} | {last['params'] / 1e6:.2f}M | {last['val_loss']:.4f} | {best:.4f} | {delta} | "
            f"{last['elapsed_s'] / args.steps:.3f} |"
        )
    table = "\n".join(lines)
    with open(path + ".md", "w") as f:
        f.write(table + "\n")
    with open(path + ".json", "w") as f:
        json.dump({"setup": setup, "final_val_loss": {m: r["val_loss"] for m, r in finals.items()}, "rows": rows},
                  f, indent=2)  # fmt: skip
    return table


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the few fp32 matmuls outside autocast
    begin = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)  # before any training: a folder that cannot be made fails at once
    try:
        train, val, tokenizer = token_splits(args.corpus, args.seq, seed=args.seed, num_docs=args.docs)
    except ValueError as exc:  # a split too small for one block of --seq: a usage error, not a traceback
        raise SystemExit(f"attn_res_replication.py: error: --seq {args.seq} --docs {args.docs}: {exc}") from None
    print(f"{args.corpus}: {train.numel():,} train / {val.numel():,} validation tokens; device {device}", flush=True)
    if args.budget_s > 0:
        fit_budget(args, calibrate(args, train, tokenizer.vocab_size, device))
    rows, table = [], ""
    for mode in args.modes:
        rows += train_one(mode, args, train, val, tokenizer.vocab_size, device)
        table = write_outputs(rows, args, device)  # after every mode: a run cut short keeps what it finished
    print(table)
    print(f"wrote {args.out}/attn_res_replication.{{csv,json,md}} (and .png with matplotlib) in "
          f"{time.perf_counter() - begin:.0f} s")
    return table


if __name__ == "__main__":
    main()
