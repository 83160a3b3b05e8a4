"""Replicate the Attention Residuals comparison (arXiv 2603.15031) at small scale.

Trains a Llama-style decoder from scratch three times, with the standard residual, Block AttnRes and Full
AttnRes, on the same data in the same order with the same seed and steps, and evaluates the validation loss
on held-out documents periodically. Writes a CSV of the curves, a PNG plot and a markdown table.

Data never leaves the machine: a synthetic grammar language (default) or the Python standard library's
docstrings, byte-level tokenised (``recipes/data.py``).

  python recipes/attn_res_replication.py --tiny          # ~1 minute on a CPU (smoke test)
  python recipes/attn_res_replication.py                 # CPU-small (~5M parameters)
  python recipes/attn_res_replication.py --preset gpu    # ~40M parameters, a few minutes per model on one GPU
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time

import torch
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # recipes/data.py, without the repo root
from data import CORPORA, token_splits  # noqa: E402

from kimi_hf.models.attn_res import AttnResConfig, AttnResForCausalLM  # noqa: E402

PRESETS = {
    "tiny": dict(hidden=64, layers=2, heads=4, intermediate=128, seq=64, batch=8, steps=30, eval_every=10,
                 eval_batches=4, lr=3e-3, warmup=5, block_size=2, docs=4000),
    "cpu": dict(hidden=128, layers=4, heads=4, intermediate=320, seq=128, batch=16, steps=300, eval_every=50,
                eval_batches=8, lr=2e-3, warmup=30, block_size=4, docs=4000),
    "gpu": dict(hidden=512, layers=12, heads=8, intermediate=1408, seq=512, batch=32, steps=1200, eval_every=200,
                eval_batches=16, lr=1e-3, warmup=100, block_size=6, docs=40000),
}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--tiny", action="store_true", help="shorthand for --preset tiny")
    p.add_argument("--modes", nargs="+", default=["standard", "block", "full"], choices=("standard", "block", "full"))
    p.add_argument("--corpus", choices=CORPORA, default="grammar", help="--docs sets the grammar corpus' size")
    p.add_argument("--out", default="attn_res_replication", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    for name in PRESETS["cpu"]:
        kind = float if name == "lr" else int
        p.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None, help=f"override the preset's {name}")
    args = p.parse_args(argv)
    if args.tiny:
        args.preset = "tiny"
    for name, value in PRESETS[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.block_size > 2 * args.layers:
        p.error(f"--block-size {args.block_size} exceeds the {2 * args.layers} sublayers")
    return args


def build_model(args: argparse.Namespace, mode: str, vocab_size: int) -> AttnResForCausalLM:
    config = AttnResConfig(
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
    torch.manual_seed(args.seed)
    return AttnResForCausalLM(config)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: not on norms, embeddings' bias-like vectors or the AttnRes pseudo-queries."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (decay if param.dim() >= 2 and "attn_res" not in name else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def evaluate(model, val: torch.Tensor, args, device, autocast) -> float:
    model.eval()
    total, count = 0.0, 0
    for start in range(0, min(len(val), args.eval_batches * args.batch), args.batch):
        x = val[start : start + args.batch].to(device)
        with autocast():
            loss = model(x, labels=x).loss
        total += loss.item() * x.numel()
        count += x.numel()
    model.train()
    return total / count


def train_one(mode: str, args, train: torch.Tensor, val: torch.Tensor, vocab_size: int, device) -> list[dict]:
    model = build_model(args, mode, vocab_size).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(_param_groups(model, 0.1), lr=args.lr, betas=(0.9, 0.95))

    def lr_factor(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    use_bf16 = device.type == "cuda"

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)

    order = torch.Generator().manual_seed(args.seed)  # the same batches, in the same order, for every mode
    rows, start = [], time.perf_counter()
    model.train()
    bar = tqdm(range(1, args.steps + 1), desc=f"{mode:>8}", dynamic_ncols=True)
    for step in bar:
        x = train[torch.randint(len(train), (args.batch,), generator=order)].to(device)
        with autocast():
            loss = model(x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % args.eval_every == 0 or step == args.steps:
            val_loss = evaluate(model, val, args, device, autocast)
            elapsed = time.perf_counter() - start
            rows.append(dict(mode=mode, step=step, train_loss=loss.item(), val_loss=val_loss,
                             params=n_params, elapsed_s=elapsed))  # fmt: skip
            bar.set_postfix(train=f"{loss.item():.3f}", val=f"{val_loss:.3f}")
    return rows


def write_outputs(rows: list[dict], args) -> str:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "attn_res_replication.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in args.modes:
        curve = [r for r in rows if r["mode"] == mode]
        ax.plot([r["step"] for r in curve], [r["val_loss"] for r in curve], marker="o", label=mode)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title(f"AttnRes replication ({args.corpus}, preset {args.preset})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "attn_res_replication.png"), dpi=120)
    plt.close(fig)

    finals = {m: [r for r in rows if r["mode"] == m][-1] for m in args.modes}
    base = finals.get("standard")
    lines = [
        f"AttnRes replication: corpus {args.corpus}, preset {args.preset}, {args.steps} steps of "
        f"{args.batch}x{args.seq} tokens, d {args.hidden}, {args.layers} layers ({2 * args.layers} sublayers), "
        f"block size {args.block_size}, seed {args.seed}",
        "",
        "| residual | params | final val loss | best val loss | vs standard | s/step |",
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
    with open(os.path.join(args.out, "attn_res_replication.md"), "w") as f:
        f.write(table + "\n")
    return table


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    train, val, tokenizer = token_splits(args.corpus, args.seq, seed=args.seed, num_docs=args.docs)
    print(f"{args.corpus}: {train.numel():,} train / {val.numel():,} validation tokens; device {device}")
    rows = []
    for mode in args.modes:
        rows += train_one(mode, args, train, val, tokenizer.vocab_size, device)
    table = write_outputs(rows, args)
    print(table)
    print(f"wrote {args.out}/attn_res_replication.{{csv,png,md}}")
    return table


if __name__ == "__main__":
    main()
