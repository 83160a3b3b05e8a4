"""Does CE-LoRA fine-tune as well as LoRA? Same model, data, seed and step budget; exact-match accuracy.

1. A tiny Llama is pre-trained (all weights) on carry-less multi-digit addition, so that its projections
   have the structure of trained weights.
2. It is fine-tuned on true addition (carries) with PEFT LoRA and with CE-LoRA at keep ratios 0.25, 0.5,
   0.65 and the paper's per-module ratios; LoRA r16, alpha 32, all seven projections, identical budgets.
3. For each: final eval loss, exact-match accuracy of greedy answers on held-out problems, median step time.

Writes ``results.csv``, ``curves.csv`` (train/eval loss per step), ``loss.png`` and ``results.md`` to
``--out``. Everything is generated locally (``recipes/ce_lora_task.py``); nothing is downloaded.

  python recipes/ce_lora_quality.py --tiny            # CPU smoke test (~1-2 minutes)
  python recipes/ce_lora_quality.py --preset gpu      # a few minutes on one GPU
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time

import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # recipes/ce_lora_task.py, without the repo root
from ce_lora_task import VOCAB, collate, exact_match, make_examples  # noqa: E402

from peft import LoraConfig, get_peft_model  # noqa: E402

from kimi_hf.peft import PAPER_RATIOS, CELoraConfig  # noqa: E402

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PRESETS = {
    "tiny": dict(hidden=256, layers=2, heads=4, kv_heads=2, intermediate=512, digits=3, pretrain_steps=40,
                 finetune_steps=30, batch=32, train_size=4000, eval_size=128, pretrain_lr=2e-3, lr=3e-3,
                 recompute_every=10, eval_every=10),
    "gpu": dict(hidden=512, layers=6, heads=8, kv_heads=4, intermediate=1408, digits=5, pretrain_steps=1500,
                finetune_steps=800, batch=256, train_size=200000, eval_size=2048, pretrain_lr=1e-3, lr=2e-3,
                recompute_every=200, eval_every=100),
}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="gpu")
    p.add_argument("--tiny", action="store_true", help="shorthand for --preset tiny (CPU smoke test)")
    p.add_argument("--ratios", nargs="+", default=["0.25", "0.5", "0.65", "paper"],
                   help="CE-LoRA keep ratios to compare with LoRA ('paper' = per-module paper defaults)")  # fmt: skip
    p.add_argument("--out", default="ce_lora_quality", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    for name, value in PRESETS["gpu"].items():
        flag = f"--{name.replace('_', '-')}"
        p.add_argument(flag, type=type(value), default=None, help=f"override the preset's {name}")
    args = p.parse_args(argv)
    if args.tiny:
        args.preset = "tiny"
    for name, value in PRESETS[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for ratio in args.ratios:
        if ratio != "paper" and not 0.0 < float(ratio) <= 1.0:
            p.error(f"--ratios: {ratio!r} is neither 'paper' nor a number in (0, 1]")
    return args


class StepTimer(TrainerCallback):
    """Wall-clock time of each optimizer step (synchronised on CUDA)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._start)


def training_args(args: argparse.Namespace, out: str, steps: int, lr: float, evaluate: bool) -> TrainingArguments:
    return TrainingArguments(
        output_dir=out,
        max_steps=steps,
        per_device_train_batch_size=args.batch,
        per_device_eval_batch_size=args.batch,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, steps // 20),
        weight_decay=0.0,
        logging_steps=max(1, args.eval_every // 5),
        eval_strategy="steps" if evaluate else "no",
        eval_steps=args.eval_every if evaluate else None,
        save_strategy="no",
        report_to=[],
        bf16=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),
        seed=args.seed,
        data_seed=args.seed,
        dataloader_drop_last=True,
    )


def pretrain(args: argparse.Namespace) -> tuple[dict[str, torch.Tensor], LlamaConfig]:
    """Pre-train the base model on carry-less addition; return its weights and config."""
    config = LlamaConfig(
        vocab_size=len(VOCAB), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=4 * args.digits + 8, pad_token_id=0, bos_token_id=None, eos_token_id=1,
    )  # fmt: skip
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config)
    data = make_examples(args.train_size, args.digits, carry=False, seed=args.seed + 1)
    train = Dataset.from_dict({k: data[k] for k in ("input_ids", "labels")})
    Trainer(
        model=model,
        args=training_args(args, os.path.join(args.out, "pretrain"), args.pretrain_steps, args.pretrain_lr, False),
        train_dataset=train,
        data_collator=collate,
    ).train()
    return {k: v.detach().clone().cpu() for k, v in model.state_dict().items()}, config


def method_configs(args: argparse.Namespace) -> list[tuple[str, LoraConfig]]:
    common = dict(r=16, lora_alpha=32, target_modules=PROJECTIONS, task_type="CAUSAL_LM")
    methods: list[tuple[str, LoraConfig]] = [("LoRA", LoraConfig(**common))]
    for ratio in args.ratios:
        ce_ratio = dict(PAPER_RATIOS) if ratio == "paper" else float(ratio)
        name = "CE-LoRA paper ratios" if ratio == "paper" else f"CE-LoRA {float(ratio):g}"
        methods.append((name, CELoraConfig(ce_ratio=ce_ratio, ce_recompute_every=args.recompute_every, **common)))
    return methods


def fine_tune(args, name, peft_config, weights, config, train, evaluation, eval_data) -> tuple[dict, list[dict]]:
    model = LlamaForCausalLM(config)
    model.load_state_dict(weights)
    torch.manual_seed(args.seed)  # identical adapter init for every method
    model = get_peft_model(model, peft_config)
    timer = StepTimer()
    folder = os.path.join(args.out, name.replace(" ", "_"))
    trainer = Trainer(
        model=model,
        args=training_args(args, folder, args.finetune_steps, args.lr, True),
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=collate,
        callbacks=[timer],
    )
    trainer.train()
    eval_loss = trainer.evaluate()["eval_loss"]
    accuracy = exact_match(model, eval_data["prompt"], eval_data["target"])
    steady = timer.times[len(timer.times) // 10 :] or timer.times  # skip warm-up (and CE-LoRA's first exact step)
    row = {"method": name, "eval_loss": eval_loss, "exact_match": accuracy,
           "step_ms": 1e3 * statistics.median(steady), "steps": args.finetune_steps}  # fmt: skip
    curves = [
        {"method": name, "step": h["step"], "kind": "eval" if "eval_loss" in h else "train",
         "loss": h.get("eval_loss", h.get("loss"))}
        for h in trainer.state.log_history
        if "eval_loss" in h or "loss" in h
    ]  # fmt: skip
    return row, curves


def write_outputs(args: argparse.Namespace, rows: list[dict], curves: list[dict]) -> str:
    with open(os.path.join(args.out, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(args.out, "curves.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(curves[0]))
        writer.writeheader()
        writer.writerows(curves)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, kind in zip(axes, ("train", "eval")):
        for row in rows:
            pts = [(c["step"], c["loss"]) for c in curves if c["method"] == row["method"] and c["kind"] == kind]
            if pts:
                ax.plot(*zip(*pts), label=row["method"], marker="o" if kind == "eval" else None, markersize=3)
        ax.set(title=f"{kind} loss", xlabel="fine-tuning step", ylabel="loss", yscale="log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "loss.png"), dpi=120)

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    lora_ms = rows[0]["step_ms"]
    lines = [
        f"CE-LoRA vs LoRA: {args.digits}-digit addition, tiny Llama (d {args.hidden}, {args.layers} layers), "
        f"{args.finetune_steps} fine-tuning steps x batch {args.batch}, {device}, seed {args.seed}",
        "",
        "| method | eval loss | exact match | step ms | step time vs LoRA |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['method']} | {r['eval_loss']:.4f} | {100 * r['exact_match']:.1f}% | {r['step_ms']:.1f} |"
        f" {lora_ms / r['step_ms']:.2f}x |"
        for r in rows
    ]
    table = "\n".join(lines)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table + "\n")
    return table


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    weights, config = pretrain(args)
    data = make_examples(args.train_size, args.digits, carry=True, seed=args.seed + 2)
    eval_data = make_examples(args.eval_size, args.digits, carry=True, seed=args.seed + 3)
    train = Dataset.from_dict({k: data[k] for k in ("input_ids", "labels")})
    evaluation = Dataset.from_dict({k: eval_data[k] for k in ("input_ids", "labels")})
    rows, curves = [], []
    for name, peft_config in method_configs(args):
        row, curve = fine_tune(args, name, peft_config, weights, config, train, evaluation, eval_data)
        rows.append(row)
        curves.extend(curve)
    print(write_outputs(args, rows, curves))


if __name__ == "__main__":
    main()
