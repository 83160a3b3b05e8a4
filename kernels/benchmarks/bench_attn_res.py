"""Benchmark Attention Residuals in a ~1B dense decoder: standard residual vs Block / Full AttnRes.

Per variant (one model per residual mode, the depth-attention implementation switched in place):
training step (forward + backward of the LM loss, no optimizer) and its peak memory, prefill latency
(forward without cache at the training shape, under no_grad) and per-token decode latency (B1, KV cache).

Implementations of the depth attention:
  triton  kimi_hf's fused kernels (sources stored once, cached rstd, sublayer PreNorm fused and h recomputed in
          backward; two-phase at inference)
  torch   kimi_hf's plain-torch backend (sources kept once, per-source loop; two-phase at inference)
  stack   the naive formula: stack all sources + RMSNorm + softmax at every sublayer (REFERENCE's 1.75x)
  liger   Liger-Kernel 0.8.5's fused AttnRes op (stacks the sources at every sublayer), if importable

The standard residual runs transformers-style (residual add + eager RMSNorm), as the AttnRes variants other
than triton do. Median times by triton.testing.do_bench on CUDA (time.perf_counter medians with --tiny on CPU).
Examples:
  python kernels/benchmarks/bench_attn_res.py                       # ~1B dense, B4 T2048 bf16, on a GPU
  python kernels/benchmarks/bench_attn_res.py --tiny                # CPU smoke test
  python kernels/benchmarks/bench_attn_res.py --model kimi_linear   # ~1B Kimi Linear MoE config
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch
import transformers

import kimi_hf.modules.attn_res as attn_res_module
from kimi_hf.kernels.attn_res import SourceBank, naive_depth_attention, rms_norm

DENSE_1B = dict(
    vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
    num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=4096,
)  # fmt: skip
DENSE_TINY = dict(
    vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
)  # fmt: skip
# REFERENCE.md section 1: the ~1B MoE Kimi Linear config (1.07B parameters).
KIMI_LINEAR_1B = dict(
    vocab_size=32000, hidden_size=2048, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=16,
    linear_attn_config={"kda_layers": [1, 2, 3, 5, 6, 7], "full_attn_layers": [4, 8], "num_heads": 16,
                        "head_dim": 128, "short_conv_kernel_size": 4},
    kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
    num_experts=16, num_experts_per_token=4, moe_intermediate_size=1024, num_shared_experts=1,
    first_k_dense_replace=1, intermediate_size=8192, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)  # fmt: skip
KIMI_LINEAR_TINY = dict(
    vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
    linear_attn_config={"kda_layers": [1], "full_attn_layers": [2], "num_heads": 2, "head_dim": 32,
                        "short_conv_kernel_size": 4},
    kv_lora_rank=32, q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16,
    num_experts=4, num_experts_per_token=2, moe_intermediate_size=32, num_shared_experts=1,
    first_k_dense_replace=1, intermediate_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)  # fmt: skip
IMPLS = ("triton", "torch", "stack", "liger")


def _liger_function():
    try:
        from liger_kernel.ops.attn_res import LigerAttnResFunction
    except ImportError:
        return None
    return LigerAttnResFunction


def _stacked(bank: SourceBank, partial: torch.Tensor | None) -> torch.Tensor:
    return torch.stack([*bank.handles, *([partial] if partial is not None else [])])


@contextlib.contextmanager
def depth_attention_impl(impl: str, eps: float):
    """Route the module's one-pass depth attention through ``impl`` ("stack"/"liger" need the torch bank)."""
    if impl in ("triton", "torch"):
        yield
        return
    if impl == "stack":

        def mix(bank, query, gain, partial):
            return naive_depth_attention(_stacked(bank, partial), query, gain, eps)

    else:
        liger = _liger_function()

        def mix(bank, query, gain, partial):
            return liger.apply(_stacked(bank, partial), query, gain, eps)

    def op(bank, query, gain, partial=None, norm_weight=None, norm_eps=1e-6):
        h = mix(bank, query, gain, partial)
        return rms_norm(h, norm_weight, norm_eps) if norm_weight is not None else h

    original = attn_res_module.depth_attention
    attn_res_module.depth_attention = op
    try:
        yield
    finally:
        attn_res_module.depth_attention = original


def _configure(model: torch.nn.Module, impl: str) -> None:
    """Point the model's AttentionResiduals at ``impl`` (two-phase inference only for kimi_hf's own backends)."""
    for module in model.modules():
        if isinstance(module, attn_res_module.AttentionResiduals):
            module.backend = "triton" if impl == "triton" else "torch"
            module.two_phase = impl in ("triton", "torch")


def _timer(device: torch.device, reps: int) -> Callable[[Callable[[], object]], float]:
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=max(1, reps // 4) * 25, rep=reps * 100, return_mode="median")

    def cpu_median(fn):
        fn()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    return cpu_median


def build_model(args: argparse.Namespace, residual: str, device: torch.device, dtype: torch.dtype):
    overrides = {"residual": residual, "attn_res_block_size": args.block_size, "attn_implementation": args.attn}
    if args.model == "dense":
        from kimi_hf.models.attn_res import AttnResConfig, AttnResForCausalLM

        config = AttnResConfig(**(DENSE_TINY if args.tiny else DENSE_1B), **overrides)
        cls = AttnResForCausalLM
    else:
        import kimi_hf

        cls = getattr(kimi_hf, "KimiLinearForCausalLM", None)
        config_cls = getattr(kimi_hf, "KimiLinearConfig", None)
        if cls is None or config_cls is None:
            raise SystemExit("kimi_hf.KimiLinearForCausalLM is not available in this installation")
        config = config_cls(**(KIMI_LINEAR_TINY if args.tiny else KIMI_LINEAR_1B), **overrides)
    torch.manual_seed(0)
    with torch.device(device):
        model = cls(config).to(dtype)
    return model


def bench_variant(model, impl: str, args, device, timer) -> dict:
    _configure(model, impl)
    vocab = model.config.vocab_size
    gen = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=gen).to(device)
    eps = getattr(model.config, "attn_res_eps", 1e-6)
    row: dict = {}
    with depth_attention_impl(impl, eps):
        model.train()

        def step():
            model(ids, labels=ids, use_cache=False).loss.backward()
            model.zero_grad(set_to_none=True)

        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        row["train_ms"] = timer(step)
        model.eval()
        with torch.no_grad():
            row["prefill_ms"] = timer(lambda: model(ids, use_cache=False))
            prompt = torch.randint(0, vocab, (1, args.decode_prompt), generator=gen).to(device)
            row["decode_ms"] = _decode_ms(model, prompt, args.decode_tokens, device)
    return row


def _decode_ms(model, prompt: torch.Tensor, steps: int, device: torch.device) -> float:
    """Median latency of one greedy decoding step with the KV cache (the model's own cache object)."""
    out = model(prompt, use_cache=True)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    token = out.logits[:, -1:].argmax(-1)
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = model(token, use_cache=True, past_key_values=cache)
        token = out.logits[:, -1:].argmax(-1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[1:] if len(times) > 1 else times)


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def markdown(results: list[dict], header: dict) -> str:
    base = next((r for r in results if r["residual"] == "standard"), None)
    lines = [f"### AttnRes benchmark ({header['model']})", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()]
    columns = ["residual", "depth attention"]
    columns += ["train step ms", "x std", "peak GiB", "x std", "prefill ms", "x std", "decode ms/token", "x std"]
    lines += ["", "| " + " | ".join(columns) + " |", "| --- | --- |" + " ---: |" * 8]
    for r in results:
        cells = [r["residual"], r["impl"]]
        for key in ("train_ms", "peak_gib", "prefill_ms", "decode_ms"):
            value = r.get(key)
            ratio = value / base[key] if base and value is not None and base.get(key) else None
            cells += [_fmt(value), _fmt(ratio, ".3f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("dense", "kimi_linear"), default="dense")
    p.add_argument("--tiny", action="store_true", help="tiny config on CPU (smoke test); times are not meaningful")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 4; 2 with --tiny)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default 2048; 32 with --tiny)")
    p.add_argument("--block-size", type=int, default=None, help="sublayers per block (default 8; 2 with --tiny)")
    p.add_argument("--modes", nargs="+", default=["standard", "block", "full"], choices=("standard", "block", "full"))
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--attn", default="sdpa", help="attention implementation (sdpa, eager, ...)")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float32"), help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--reps", type=int, default=None, help="timing repetitions (default 10; 2 with --tiny)")
    p.add_argument("--decode-prompt", type=int, default=None, help="decode prompt length (default 512; 8 tiny)")
    p.add_argument("--decode-tokens", type=int, default=None, help="decode steps timed (default 32; 3 tiny)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    tiny = args.tiny
    args.batch = args.batch or (2 if tiny else 4)
    args.seq = args.seq or (32 if tiny else 2048)
    args.reps = args.reps or (2 if tiny else 10)
    args.decode_prompt = args.decode_prompt or (8 if tiny else 512)
    args.decode_tokens = args.decode_tokens or (3 if tiny else 32)
    args.block_size = args.block_size or (2 if tiny else 8)
    if args.block_size < 1:
        p.error(f"--block-size must be >= 1, got {args.block_size}")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    impls = list(args.impls)
    if "liger" in impls and (_liger_function() is None or device.type != "cuda"):
        print("liger-kernel's AttnRes op is not importable here (or no CUDA): skipping the 'liger' anchor")
        impls.remove("liger")
    if "triton" in impls and device.type != "cuda":
        impls.remove("triton")  # Triton's interpreter would only time Python
    timer = _timer(device, args.reps)
    results = []
    for residual in args.modes:
        model = build_model(args, residual, device, dtype)
        for impl in ["torch"] if residual == "standard" else impls:
            row = {"residual": residual, "impl": "-" if residual == "standard" else impl}
            try:
                row.update(bench_variant(model, impl, args, device, timer))
            except torch.OutOfMemoryError:  # e.g. Full AttnRes with the stacking reference: report, go on
                row["impl"] += " (OOM)"
                model.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
            results.append(row)
            print(json.dumps(row), flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    header = {
        "model": f"{args.model}{' tiny' if args.tiny else ' ~1B'}",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "versions": f"torch {torch.__version__}, transformers {transformers.__version__}, "
        + (f"triton {__import__('triton').__version__}" if device.type == "cuda" else "no triton timing"),
        "shape": f"B{args.batch} T{args.seq} {str(dtype).removeprefix('torch.')}, attention {args.attn}, "
        f"block size {args.block_size} sublayers; decode B1 after a {args.decode_prompt}-token prompt",
        "timing": "triton.testing.do_bench median" if device.type == "cuda" else "perf_counter median",
    }
    print(markdown(results, header))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "results": results}, f, indent=2)
    return results


if __name__ == "__main__":
    main()
