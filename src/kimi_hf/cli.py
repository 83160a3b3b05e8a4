"""``kimi-hf`` command line.

``kimi-hf demo`` is the package's main job at CPU size: build a small Kimi Linear, train it with the
transformers Trainer on text the machine already has, evaluate, generate with the hybrid cache
(checked against recomputation), save as safetensors and reload it twice (our class, and remote
code through ``AutoModelForCausalLM(..., trust_remote_code=True)``), checking the logits.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch


DEFAULT_ATTN_RES_BLOCK_SIZE = 2


def _demo_config(args: argparse.Namespace, vocab_size: int, pad: int, bos: int, eos: int):
    from kimi_hf import KimiLinearConfig

    layers = args.layers
    block_size = args.attn_res_block_size or DEFAULT_ATTN_RES_BLOCK_SIZE  # None: not given
    full = sorted({layers} | set(range(4, layers + 1, 4)))  # the 48B model's pattern, scaled down
    return KimiLinearConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=4 * args.hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        num_experts=8,
        num_experts_per_token=2,
        moe_intermediate_size=args.hidden_size,
        routed_scaling_factor=1.0,
        router_bias_update_rate=1e-3,
        linear_attn_config={
            "kda_layers": [i for i in range(1, layers + 1) if i not in full],
            "full_attn_layers": full,
            "num_heads": 4,
            "head_dim": args.hidden_size // 4,
            "short_conv_kernel_size": 4,
        },
        residual=args.residual,
        attn_res_block_size=block_size if args.residual == "block" else None,
        pad_token_id=pad,
        bos_token_id=bos,
        eos_token_id=eos,
        model_max_length=args.seq_len,
    )


def _lm_datasets(tokenizer, seq_len: int, eval_fraction: float = 0.05):
    """Train/eval splits of the stdlib corpus, tokenised and cut into blocks of ``seq_len`` tokens."""
    from datasets import Dataset

    from kimi_hf.data import stdlib_corpus

    docs = Dataset.from_dict({"text": stdlib_corpus()})

    def tokenize(batch):
        return tokenizer([t + tokenizer.eos_token for t in batch["text"]], add_special_tokens=False)

    def blocks(batch):
        ids = [i for seq in batch["input_ids"] for i in seq]
        n = len(ids) // seq_len * seq_len
        chunks = [ids[i : i + seq_len] for i in range(0, n, seq_len)]
        return {"input_ids": chunks, "attention_mask": [[1] * seq_len for _ in chunks]}

    tokenized = docs.map(tokenize, batched=True, remove_columns=["text"], desc="tokenize")
    grouped = tokenized.map(blocks, batched=True, remove_columns=tokenized.column_names, desc="group")
    if len(grouped) < 2:  # one to train on and one held out; with fewer, the split or the Trainer fails obscurely
        raise SystemExit(f"kimi-hf demo: error: --seq-len {seq_len}: the corpus makes {len(grouped)} blocks of that "
                         "length, at least 2 are needed (one held out): use a shorter --seq-len")  # fmt: skip
    split = grouped.train_test_split(test_size=eval_fraction, seed=0)
    return split["train"], split["test"]


def _max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def remote_code_logits(
    save_dir: Path, input_ids: torch.Tensor, attention_mask: torch.Tensor, path: Path
) -> torch.Tensor:
    """Logits of the model in ``save_dir`` loaded through remote code (``trust_remote_code=True``) in a fresh
    interpreter that never imported kimi_hf itself; the child writes them to ``path``.

    A failing child ends the demo with its own error (the last lines of its stderr), not a bare exit status."""
    import subprocess

    code = (
        "import sys, torch; from transformers import AutoModelForCausalLM;"
        f"m = AutoModelForCausalLM.from_pretrained({str(save_dir)!r}, trust_remote_code=True).eval();"
        f"ids = torch.tensor({input_ids.cpu().tolist()}); mask = torch.tensor({attention_mask.cpu().tolist()});"
        "torch.save(m(ids, attention_mask=mask).logits.float(), sys.argv[1])"
    )
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-20:])
        raise SystemExit(f"loading {save_dir} through remote code failed (exit status {done.returncode}):\n{tail}")
    return torch.load(path)


def run_demo(args: argparse.Namespace) -> dict:
    """Train, evaluate, generate, save and reload; return a summary dict (also printed as JSON)."""
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments, set_seed

    from kimi_hf import KimiLinearForCausalLM
    from kimi_hf.data import ByteTokenizer

    set_seed(args.seed)
    out = Path(args.output_dir)
    tokenizer = ByteTokenizer()
    config = _demo_config(args, len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    model = KimiLinearForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"Kimi Linear demo model: {n_params / 1e6:.2f}M parameters, layers {config.layer_types}", flush=True)

    train, evaluation = _lm_datasets(tokenizer, args.seq_len)
    training_args = TrainingArguments(
        output_dir=str(out / "trainer"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.steps // 10),
        weight_decay=0.01,
        logging_steps=max(1, args.steps // 10),
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        use_cpu=args.device == "cpu",
        bf16=args.device != "cpu" and torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
    )
    if args.gradient_checkpointing:
        # transformers >= 5.2x renamed it `activation_checkpointing_enable`; 5.17 only has the old name.
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation.select(range(min(len(evaluation), args.eval_blocks))),
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )
    train_result = trainer.train()
    metrics = trainer.evaluate()
    model = trainer.model.eval()

    # Batched, left-padded generation with the hybrid cache, checked against full recomputation.
    tokenizer.padding_side = "left"
    prompts = ["Return a new", "The logging module"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
    gen_kwargs = dict(max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        cached = model.generate(**batch, **gen_kwargs)
        recomputed = model.generate(**batch, use_cache=False, **gen_kwargs)
    texts = tokenizer.batch_decode(cached[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    for prompt, text in zip(prompts, texts):
        print(f"  {prompt!r} -> {text!r}")

    save_dir = out / "model"
    model.save_pretrained(save_dir)
    tokenizer.save_pretrained(save_dir)
    probe = batch["input_ids"]
    with torch.no_grad():
        reference = model(probe, attention_mask=batch["attention_mask"]).logits.float().cpu()
        reloaded = KimiLinearForCausalLM.from_pretrained(save_dir).to(model.device).eval()
        ours = reloaded(probe, attention_mask=batch["attention_mask"]).logits.float().cpu()
    remote = remote_code_logits(save_dir, probe, batch["attention_mask"], out / "remote_logits.pt")

    summary = {
        "parameters": n_params,
        "train_loss": train_result.training_loss,
        "eval_loss": metrics["eval_loss"],
        "eval_perplexity": math.exp(metrics["eval_loss"]),
        "cached_generation_equals_recomputation": bool(torch.equal(cached, recomputed)),
        "reload_rel_diff": _max_rel_diff(ours, reference),
        "remote_code_rel_diff": _max_rel_diff(remote, reference),
        "saved_to": str(save_dir),
        "files": sorted(p.name for p in save_dir.iterdir()),
    }
    print(json.dumps(summary, indent=2))
    check_summary(summary)
    return summary


def check_summary(summary: dict) -> None:
    """End the demo with an error naming the check that ``summary`` (:func:`run_demo`'s) fails.

    NaN fails every check: a diverged run (``--learning-rate 1e30``: NaN losses, NaN logits, so NaN relative
    differences, which ``> 1e-5`` let through) passed them all and exited 0."""
    if not (math.isfinite(summary["train_loss"]) and math.isfinite(summary["eval_loss"])):
        raise SystemExit(f"training diverged: train loss {summary['train_loss']}, eval loss {summary['eval_loss']} "
                         "(try a smaller --learning-rate)")  # fmt: skip
    if not summary["cached_generation_equals_recomputation"]:
        raise SystemExit("cached generation differs from recomputation")
    if not (summary["reload_rel_diff"] <= 1e-5 and summary["remote_code_rel_diff"] <= 1e-5):
        raise SystemExit(f"reloaded model's logits differ (relative difference {summary['reload_rel_diff']} with our "
                         f"class, {summary['remote_code_rel_diff']} through remote code)")  # fmt: skip


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (the option's name is added by argparse)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (NaN and infinity refused: ``--learning-rate inf`` trained to NaN)."""
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def seq_len_int(text: str) -> int:
    """argparse type: a training block length >= 2 (each token is trained to predict the next one: a block of one
    token has no target, and ``--seq-len 1`` trained on nothing, with loss 0.0 and an eval loss of NaN)."""
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be >= 2 (the next-token loss needs two tokens), got {text}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a number >= 0 (NaN refused)."""
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def seed_int(text: str) -> int:
    """argparse type: a seed, 0 <= seed < 2**32 (numpy's range, which transformers' set_seed goes through)."""
    value = int(text)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**32), got {text}")
    return value


def check_output_dir(parser: argparse.ArgumentParser, path: str | None, option: str = "--output-dir") -> None:
    """``parser.error`` when ``path`` exists and is not a folder (it would fail after the work)."""
    if path is not None and os.path.exists(path) and not os.path.isdir(path):
        parser.error(f"{option} {path!r} exists and is not a folder")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kimi-hf", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="train, evaluate, generate with, save and reload a small Kimi Linear (CPU-sized by default)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--output-dir", default="outputs/demo", help="where the trained model is saved")
    demo.add_argument("--steps", type=positive_int, default=200, help="training steps")
    demo.add_argument("--batch-size", type=positive_int, default=8)
    demo.add_argument("--seq-len", type=seq_len_int, default=128, help="tokens (bytes) per training block")
    demo.add_argument("--hidden-size", type=positive_int, default=128)
    demo.add_argument("--layers", type=positive_int, default=4, help="decoder layers (MLA every 4th and at the last)")
    demo.add_argument("--learning-rate", type=positive_float, default=3e-3)
    demo.add_argument("--residual", choices=["standard", "block", "full"], default="standard",
                      help="residual connection: standard, or Attention Residuals (block/full)")  # fmt: skip
    demo.add_argument("--attn-res-block-size", type=positive_int, default=None,
                      help=f"sublayers per block, with --residual block only "
                           f"(default {DEFAULT_ATTN_RES_BLOCK_SIZE})")  # fmt: skip
    demo.add_argument("--gradient-checkpointing", action="store_true")
    demo.add_argument("--eval-blocks", type=positive_int, default=64, help="held-out blocks to evaluate on")
    demo.add_argument("--new-tokens", type=positive_int, default=24, help="tokens to generate per prompt")
    demo.add_argument("--device", choices=["cpu", "auto"], default="cpu", help="'auto' uses a GPU when present")
    demo.add_argument("--seed", type=seed_int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        check_output_dir(parser, args.output_dir)
        if args.attn_res_block_size is not None and args.residual != "block":  # it was ignored without a word
            parser.error(f"--attn-res-block-size applies to --residual block only, not --residual {args.residual}")
        try:  # the model's settings, checked before any data is read (a bad block size named by the config)
            _demo_config(args, 1, 0, 0, 0)
        except ValueError as exc:
            parser.error(str(exc))
        run_demo(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
