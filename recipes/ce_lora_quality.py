"""Does CE-LoRA fine-tune as well as LoRA? Same model, data, seed and step budget; exact-match accuracy.

1. A small Llama is pre-trained (all weights) on one digit task (``--pretrain-task``, default the
   carry-less digit-wise sum), so that its projections have the structure of trained weights.
2. It is fine-tuned on another (``--task``, default the digit-wise product mod 10: same attention pattern,
   a new digit table) with PEFT LoRA and with CE-LoRA at the paper's per-module ratios and at 0.5
   everywhere (``--ratios``); LoRA r16, alpha 32, all seven projections, identical data and budgets.
3. For each: final eval loss, exact-match accuracy of greedy answers on held-out problems (guessing
   gets about ``0.27**pairs``: 0 answers a quarter of the product table), median step time; and the base
   model's exact match on both tasks before fine-tuning.

Writes ``results.csv``, ``curves.csv`` (train/eval loss per step), ``loss.png`` and ``results.md`` to
``--output-dir``. With ``--base-dir`` the base model is saved there (safetensors) and later runs with the same
pre-training settings fine-tune it again instead of pre-training their own (``--seed`` then varies only the
fine-tuning: data, adapter init, data order). Everything is generated locally (``recipes/ce_lora_task.py``);
nothing is downloaded.

  python recipes/ce_lora_quality.py --tiny                       # CPU smoke test (~30 s; learns nothing)
  python recipes/ce_lora_quality.py --preset cpu_unsaturated      # ~4 minutes on CPU; LoRA not saturated (the
                                                                 # default without CUDA)
  python recipes/ce_lora_quality.py --preset gpu --output-dir q  # about 2-3 minutes on one H200
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # recipes/ce_lora_task.py, without the repo root
from ce_lora_task import PROBLEM, TASKS, VOCAB, collate, exact_match, make_examples  # noqa: E402

from peft import LoraConfig, get_peft_model  # noqa: E402

from kimi_hf.cli import check_output_dir, positive_float, positive_int, seed_int  # noqa: E402
from kimi_hf.peft import PAPER_RATIOS, CELoraConfig  # noqa: E402

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PRESETS = {
    # CPU smoke test: d 256 is the narrowest at which CE-LoRA's paper ratios drop channels
    "tiny": dict(hidden=256, layers=2, heads=4, kv_heads=2, intermediate=512, pairs=4, pretrain_steps=10,
                 finetune_steps=8, batch=32, train_size=1024, eval_size=64, pretrain_lr=3e-3, lr=3e-3,
                 recompute_every=3, eval_every=4),
    # ~4 minutes on 2 shared CPU cores (OMP_NUM_THREADS=1). Unsaturated on purpose, unlike "gpu": LoRA ends
    # at an eval loss of ~0.2 with exact match well under 100%, so a gap between methods can show.
    # recompute_every stays CELoraConfig's default (200): one channel selection, made at the first step.
    "cpu_unsaturated": dict(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=704, pairs=4,
                            pretrain_steps=300, finetune_steps=120, batch=32, train_size=9600, eval_size=256,
                            pretrain_lr=3e-3, lr=2e-3, recompute_every=200, eval_every=20),
    # ~2 minutes on one H200 (mostly per-step overhead). Sized from CPU runs at batch 32: pre-training first
    # sits at chance loss, then learns the attention pattern; d 256 x 4 layers did so after ~100 steps with
    # 4 pairs (87% exact match at 300), but not within 200 with 6 or 8 pairs (longer lines dilute attention
    # at init). LoRA then reached 58% on the product table in 120 steps. recompute_every 200 is the
    # paper's (and CELoraConfig's) default.
    "gpu": dict(hidden=512, layers=4, heads=8, kv_heads=4, intermediate=1408, pairs=4, pretrain_steps=1000,
                finetune_steps=200, batch=256, train_size=51200, eval_size=4096, pretrain_lr=2e-3, lr=2e-3,
                recompute_every=200, eval_every=25),
}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # no abbreviations: ce_lora_seeds.py forwards arguments here and refuses the ones it sets itself by name
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="settings (default: gpu on a machine with CUDA, cpu_unsaturated elsewhere; the gpu preset "
                   "takes hours on CPU)")  # fmt: skip
    p.add_argument("--tiny", action="store_true", help="shorthand for --preset tiny (CPU smoke test)")
    p.add_argument("--ratios", nargs="+", default=["paper", "0.5"],
                   help="CE-LoRA keep ratios to compare with LoRA ('paper' = per-module paper defaults)")  # fmt: skip
    p.add_argument("--pretrain-task", choices=TASKS, default="digit_sum", help="task the base model learns")
    p.add_argument("--task", choices=TASKS, default="digit_product", help="task the adapters are fine-tuned on")
    p.add_argument("--output-dir", "--out", dest="out", default="ce_lora_quality", help="output folder")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the fine-tuning data, adapter init and data order")
    p.add_argument("--base-seed", type=seed_int, default=None,
                   help="seed of the base model's pre-training (default: --seed)")  # fmt: skip
    p.add_argument("--base-dir", default=None,
                   help="keep the pre-trained base model here (safetensors) and reuse it when it is already there, "
                   "so that several fine-tuning seeds start from one base model")  # fmt: skip
    p.add_argument("--replot", action="store_true", help="only redraw loss.png from --output-dir's curves.csv")
    for name, value in PRESETS["gpu"].items():
        flag = f"--{name.replace('_', '-')}"
        kind = positive_float if isinstance(value, float) else positive_int
        p.add_argument(flag, type=kind, default=None, help=f"override the preset's {name}")
    args = p.parse_args(argv)
    if args.tiny:
        args.preset = "tiny"
    if args.preset is None:
        args.preset = "gpu" if torch.cuda.is_available() else "cpu_unsaturated"
    if args.base_seed is None:
        args.base_seed = args.seed
    for name, value in PRESETS[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for ratio in args.ratios:
        try:
            valid = ratio == "paper" or 0.0 < float(ratio) <= 1.0
        except ValueError:
            valid = False
        if not valid:
            p.error(f"--ratios: {ratio!r} is neither 'paper' nor a number in (0, 1]")
    names = [method_name(ratio) for ratio in args.ratios]
    if len(set(names)) != len(names):  # one method twice: one output folder, and rows the seeds sweep cannot pair
        p.error(f"--ratios has repeats: {' '.join(args.ratios)}")
    check_output_dir(p, args.out)
    check_output_dir(p, args.base_dir, "--base-dir")
    if args.base_dir and os.path.isdir(args.base_dir) and os.listdir(args.base_dir):
        # Only a folder this recipe filled is read back; any other model there would be overwritten by the newly
        # pre-trained one (a folder holding someone's model looks like what --base-dir asks for).
        if not os.path.exists(os.path.join(args.base_dir, "base_settings.json")):
            p.error(f"--base-dir {args.base_dir!r} holds files but no base_settings.json (not a base model saved by "
                    "this recipe); its files would be overwritten: give an empty or new folder")  # fmt: skip
    if args.replot and not os.path.exists(os.path.join(args.out, "curves.csv")):
        p.error(f"--replot: {os.path.join(args.out, 'curves.csv')} does not exist (run the recipe first)")
    if args.train_size < args.batch:  # training drops the last incomplete batch: no step would run
        p.error(f"--train-size {args.train_size} is smaller than --batch {args.batch}")
    try:
        llama_config(args)
    except Exception as exc:  # ValueError, or huggingface_hub's strict-dataclass validation error (not one)
        p.error(f"--hidden/--heads/--kv-heads: {str(exc).splitlines()[-1].strip()}")
    if args.heads % args.kv_heads:
        p.error(f"--heads {args.heads} must be a multiple of --kv-heads {args.kv_heads}")
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


def training_args(
    args: argparse.Namespace, out: str, steps: int, lr: float, evaluate: bool, seed: int
) -> TrainingArguments:
    return TrainingArguments(
        output_dir=out,
        max_steps=steps,
        per_device_train_batch_size=args.batch,
        # drop_last (below) is for the timed training steps; evaluation sees every example in whole batches
        per_device_eval_batch_size=max(d for d in range(1, args.batch + 1) if args.eval_size % d == 0),
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
        seed=seed,
        data_seed=seed,
        dataloader_drop_last=True,
    )


def as_dataset(examples: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """One dict per example: a map-style dataset for ``Trainer`` (no ``datasets`` needed on the GPU image)."""
    return [{"input_ids": ids, "labels": labels} for ids, labels in zip(examples["input_ids"], examples["labels"])]


# The settings a base model depends on: a saved one is reused only when they all match.
BASE_SETTINGS = ("base_seed", "pretrain_task", "pretrain_steps", "pretrain_lr", "hidden", "layers", "heads",
                 "kv_heads", "intermediate", "pairs", "batch", "train_size")  # fmt: skip


def llama_config(args: argparse.Namespace) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(VOCAB), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=PROBLEM * args.pairs + 8, pad_token_id=0, bos_token_id=None, eos_token_id=1,
    )  # fmt: skip


def pretrain(args: argparse.Namespace) -> LlamaForCausalLM:
    """A Llama trained from scratch (all weights) on ``--pretrain-task`` with ``--base-seed``."""
    config = llama_config(args)
    torch.manual_seed(args.base_seed)
    model = LlamaForCausalLM(config)
    train = as_dataset(make_examples(args.train_size, args.pairs, args.pretrain_task, seed=args.base_seed + 1))
    folder = os.path.join(args.out, "pretrain")
    Trainer(
        model=model,
        args=training_args(args, folder, args.pretrain_steps, args.pretrain_lr, False, args.base_seed),
        train_dataset=train,
        data_collator=collate,
    ).train()
    return model


def base_model(args: argparse.Namespace) -> LlamaForCausalLM:
    """The base model: read from ``--base-dir`` when it holds one pre-trained with these settings, else
    pre-trained now (and saved there, as safetensors, when ``--base-dir`` is given)."""
    settings = {name: getattr(args, name) for name in BASE_SETTINGS}
    record = os.path.join(args.base_dir, "base_settings.json") if args.base_dir else None
    if record and os.path.exists(record):
        with open(record) as f:
            saved = json.load(f)
        if saved != settings:
            diff = {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v}
            raise ValueError(f"--base-dir {args.base_dir} holds a base model pre-trained with other settings "
                             f"(saved, requested): {diff}")  # fmt: skip
        print(f"base model read from {args.base_dir}", flush=True)
        return LlamaForCausalLM.from_pretrained(args.base_dir, use_safetensors=True)
    model = pretrain(args)
    if record:
        model.save_pretrained(args.base_dir, safe_serialization=True)
        with open(record, "w") as f:
            json.dump(settings, f, indent=1)
    return model


def base_accuracy(
    args: argparse.Namespace, model: LlamaForCausalLM, task_eval: dict[str, torch.Tensor]
) -> tuple[float, float]:
    """The base model's exact match on held-out problems of its pre-training task and of ``task_eval`` (the
    fine-tuning task, before fine-tuning)."""
    own_eval = make_examples(args.eval_size, args.pairs, args.pretrain_task, seed=args.base_seed + 4)
    accuracy = (exact_match(model, own_eval["input_ids"], own_eval["labels"]),
                exact_match(model, task_eval["input_ids"], task_eval["labels"]))  # fmt: skip
    print(f"base model exact match: {args.pretrain_task} {accuracy[0]:.4f}, {args.task} {accuracy[1]:.4f}", flush=True)
    return accuracy


def method_name(ratio: str) -> str:
    """The name of CE-LoRA at a ``--ratios`` value in the tables and output folders (0.5 and 0.50 are one)."""
    return "CE-LoRA paper ratios" if ratio == "paper" else f"CE-LoRA {float(ratio):g}"


def method_configs(args: argparse.Namespace) -> list[tuple[str, LoraConfig]]:
    common = dict(r=16, lora_alpha=32, target_modules=PROJECTIONS, task_type="CAUSAL_LM")
    methods: list[tuple[str, LoraConfig]] = [("LoRA", LoraConfig(**common))]
    for ratio in args.ratios:
        ce_ratio = dict(PAPER_RATIOS) if ratio == "paper" else float(ratio)
        config = CELoraConfig(ce_ratio=ce_ratio, ce_recompute_every=args.recompute_every, **common)
        methods.append((method_name(ratio), config))
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
        args=training_args(args, folder, args.finetune_steps, args.lr, True, args.seed),
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=collate,
        callbacks=[timer],
    )
    trainer.train()
    eval_loss = trainer.evaluate()["eval_loss"]
    accuracy = exact_match(model, eval_data["input_ids"], eval_data["labels"])
    steady = timer.times[len(timer.times) // 10 :] or timer.times  # skip warm-up (and CE-LoRA's first exact step)
    row = {"method": name, "eval_loss": eval_loss, "exact_match": accuracy,
           "step_ms": 1e3 * statistics.median(steady), "steps": args.finetune_steps, "seed": args.seed}  # fmt: skip
    curves = [
        {"method": name, "step": h["step"], "kind": "eval" if "eval_loss" in h else "train",
         "loss": h.get("eval_loss", h.get("loss"))}
        for h in trainer.state.log_history
        if "eval_loss" in h or "loss" in h
    ]  # fmt: skip
    return row, curves


def plot_losses(folder: str) -> None:
    """``loss.png`` (train and eval loss per fine-tuning step, one line per method) from ``curves.csv``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(os.path.join(folder, "curves.csv")) as f:
        curves = list(csv.DictReader(f))
    methods = list(dict.fromkeys(c["method"] for c in curves))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, kind in zip(axes, ("train", "eval")):
        for method in methods:
            pts = [(int(c["step"]), float(c["loss"])) for c in curves if c["method"] == method and c["kind"] == kind]
            if pts:
                ax.plot(*zip(*pts), label=method, marker="o" if kind == "eval" else None, markersize=3)
        ax.set(title=f"{kind} loss", xlabel="fine-tuning step", ylabel="loss", yscale="log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "loss.png"), dpi=120)
    plt.close(fig)


def write_outputs(
    args: argparse.Namespace, rows: list[dict], curves: list[dict], accuracy: tuple[float, float]
) -> str:
    base = {"base_seed": args.base_seed, "base_pretrain_exact_match": accuracy[0], "base_task_exact_match": accuracy[1]}
    with open(os.path.join(args.out, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0], *base])
        writer.writeheader()
        writer.writerows(row | base for row in rows)
    with open(os.path.join(args.out, "curves.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(curves[0]))
        writer.writeheader()
        writer.writerows(curves)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    lines = [
        f"CE-LoRA vs LoRA: {args.task} over {args.pairs} pairs, Llama d {args.hidden} x {args.layers} layers "
        f"pre-trained on {args.pretrain_task} (seed {args.base_seed}; exact match {100 * accuracy[0]:.1f}% on it, "
        f"{100 * accuracy[1]:.1f}% on {args.task}), {args.finetune_steps} fine-tuning steps x batch "
        f"{args.batch}, {device}, fine-tuning seed {args.seed}",
        "",
        "| method | eval loss | vs LoRA | exact match | vs LoRA (points) | step ms | step time vs LoRA |",
        "|---|---|---|---|---|---|---|",
    ]
    lora = rows[0]
    lines += [
        f"| {r['method']} | {r['eval_loss']:.4f} | {100 * (r['eval_loss'] / lora['eval_loss'] - 1):+.2f}% |"
        f" {100 * r['exact_match']:.1f}% | {100 * (r['exact_match'] - lora['exact_match']):+.1f} |"
        f" {r['step_ms']:.1f} | {lora['step_ms'] / r['step_ms']:.2f}x |"
        for r in rows
    ]
    table = "\n".join(lines)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table + "\n")
    return table


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.replot:
        try:
            plot_losses(args.out)
        except ImportError:
            raise SystemExit("ce_lora_quality.py: error: --replot needs matplotlib, which is not installed") from None
        return
    os.makedirs(args.out, exist_ok=True)
    eval_data = make_examples(args.eval_size, args.pairs, args.task, seed=args.seed + 3)
    base = base_model(args)
    accuracy = base_accuracy(args, base, eval_data)
    weights, config = {k: v.detach().clone().cpu() for k, v in base.state_dict().items()}, base.config
    del base
    train = as_dataset(make_examples(args.train_size, args.pairs, args.task, seed=args.seed + 2))
    evaluation = as_dataset(eval_data)
    rows, curves = [], []
    for name, peft_config in method_configs(args):
        row, curve = fine_tune(args, name, peft_config, weights, config, train, evaluation, eval_data)
        rows.append(row)
        curves.extend(curve)
        print(json.dumps(row), flush=True)
        table = write_outputs(args, rows, curves, accuracy)  # after each method: a cut-short run keeps them
    print(table)
    try:
        plot_losses(args.out)
    except ImportError:
        Path(args.out, "loss.png").unlink(missing_ok=True)  # an earlier run's plot would sit beside these curves
        print("matplotlib is not installed: loss.png not written (redraw it elsewhere with --replot)")


if __name__ == "__main__":
    main()
