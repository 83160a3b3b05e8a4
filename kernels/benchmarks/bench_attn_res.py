"""Benchmark Attention Residuals in ~1B models: standard residual vs Block / Full AttnRes, same run.

Models (``--model``, one or both). First an untimed warm-up pass runs every configuration once (each model
class, kernel variant, cuBLAS/sdpa choice and decode shape is then compiled or initialised before any timing:
without it the first configuration of each model ran 1.2-4x slow on the H200, see BENCHMARKS.md). Then rows
are printed (JSON lines, and ``--json`` rewritten) as each finishes, in two passes: first the rows the targets
are read from (standard with the first baseline, Block and Full with the first impl) for every model, then the
anchors and a repeat of the standard row (its drift says how far apart two measurements of one configuration
are in this run); the markdown tables come at the end.
  dense        our Llama-style ``AttnResForCausalLM`` (d 2048, 16 layers = 32 sublayers, SwiGLU 5632), B4 T2048
  kimi_linear  REFERENCE.md's ~1B MoE ``KimiLinearForCausalLM`` (8 layers = 16 sublayers, KDA + MLA), B2 T4096

Per variant: training step (forward + backward of the LM loss, no optimizer), its peak memory and the memory
its forward leaves for the backward (activations: what the residual stream costs shows here; the peak is set
by the LM head's float32 logits in the loss and is the same for every residual of this design), prefill
(forward without cache at the training shape, no_grad) and decode latency per token (B1, greedy, with the
model's cache after a prompt: median of single cached one-token steps, after 20 untimed ones so that every
cache length modulo 16 has been seen). Within a row, every path also runs before it is timed.

The standard residual is the anchor of every ratio, given its best shot: its PreNorm runs as one Triton
kernel forward and one backward (``prenorm``), as AttnRes's own read fuses its PreNorm ("triton" baseline); at
inference the residual addition is fused into that kernel too (``add_prenorm``), as AttnRes's inference path
fuses its own bookkeeping into its reads.
The "torch" baseline is the transformers-style eager RMSNorm, and for the dense model transformers'
``LlamaForCausalLM`` with the same shape checks that our standard decoder is not slower than the usual one.

Depth-attention implementations of Block / Full (``--impls``):
  triton  kimi_hf's fused kernels (sources stored once, cached rstd, PreNorm fused; two-phase at inference)
  torch   kimi_hf's plain-torch backend (per-source loop; two-phase at inference)
  stack   the naive formula: stack all sources + RMSNorm + softmax at every sublayer (REFERENCE's 1.75x)
  liger   Liger-Kernel 0.8.5's fused AttnRes op (stacks the sources at every sublayer), if importable

Median times: triton.testing.do_bench on CUDA; time.perf_counter medians with --tiny on CPU (where the
Triton impls are skipped and the KDA model runs its torch reference path: a smoke test, not a measurement).

  python kernels/benchmarks/bench_attn_res.py --json out.json       # both models on a GPU (~5 min fresh)
  python kernels/benchmarks/bench_attn_res.py --model dense         # one model
  python kernels/benchmarks/bench_attn_res.py --tiny                # CPU smoke test of every code path
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
import traceback
from collections.abc import Callable

import torch
import transformers
from _profile import json_safe

import kimi_hf.modules.attn_res as attn_res_module
from kimi_hf import KimiLinearForCausalLM, KimiLinearStaticCache
from kimi_hf.kernels._launch import add_set_option, apply_set_option
from kimi_hf.kernels.attn_res import SourceBank, naive_depth_attention, rms_norm
from kimi_hf.models.kimi_linear.modeling_kimi_linear import CACHE_FIELD

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
MODELS = ("dense", "kimi_linear")
# Per model: (batch, seq, sublayers per block) on the GPU, and with --tiny.
SHAPES = {"dense": (4, 2048, 8), "kimi_linear": (2, 4096, 4)}
TINY_SHAPES = {"dense": (2, 32, 2), "kimi_linear": (2, 32, 2)}
IMPLS = ("triton", "torch", "stack", "liger")
BASELINES = ("triton", "torch")
LLAMA = "transformers Llama"


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


def configure_impl(model: torch.nn.Module, impl: str, one_pass: bool) -> None:
    """Point the model's AttentionResiduals at ``impl`` (two-phase inference only for kimi_hf's own backends, and
    not with ``one_pass``)."""
    for module in model.modules():
        if isinstance(module, attn_res_module.AttentionResiduals):
            module.backend = "triton" if impl == "triton" else "torch"
            module.two_phase = impl in ("triton", "torch") and not one_pass


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timer(device: torch.device, reps: int) -> Callable[[Callable[[], object]], float]:
    """Median milliseconds of ``fn``, after untimed calls of its own (callers have already compiled it)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        # do_bench sizes its warm-up and repetitions in ms from a 5-call estimate: ~3 untimed and ~reps timed
        # calls of a 100 ms step, more of faster ones, bounded so that the whole run stays within a few minutes.
        return lambda fn: do_bench(fn, warmup=300, rep=reps * 100, return_mode="median")

    def cpu_median(fn):
        fn()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    return cpu_median


def shape_of(args: argparse.Namespace, model_name: str) -> tuple[int, int, int]:
    batch, seq, block = (TINY_SHAPES if args.tiny else SHAPES)[model_name]
    return args.batch or batch, args.seq or seq, args.block_size or block


def build_model(args, model_name: str, residual: str, device: torch.device, dtype: torch.dtype):
    block_size = shape_of(args, model_name)[2]
    overrides = {"residual": residual, "attn_res_block_size": block_size, "attn_implementation": args.attn}
    if model_name == "dense":
        from kimi_hf.models.attn_res import AttnResConfig, AttnResForCausalLM

        config, cls = AttnResConfig(**(DENSE_TINY if args.tiny else DENSE_1B), **overrides), AttnResForCausalLM
    else:
        from kimi_hf import KimiLinearConfig, KimiLinearForCausalLM

        config = KimiLinearConfig(**(KIMI_LINEAR_TINY if args.tiny else KIMI_LINEAR_1B), **overrides)
        cls = KimiLinearForCausalLM
    torch.manual_seed(0)
    with torch.device(device):
        return cls(config).to(dtype)


def build_llama(args, device: torch.device, dtype: torch.dtype):
    """transformers' LlamaForCausalLM with the dense model's shape (untied embeddings, same eps and RoPE)."""
    from kimi_hf.models.attn_res import AttnResConfig

    ours = AttnResConfig(**(DENSE_TINY if args.tiny else DENSE_1B), residual="standard")
    config = transformers.LlamaConfig(
        vocab_size=ours.vocab_size, hidden_size=ours.hidden_size, intermediate_size=ours.intermediate_size,
        num_hidden_layers=ours.num_hidden_layers, num_attention_heads=ours.num_attention_heads,
        num_key_value_heads=ours.num_key_value_heads, max_position_embeddings=ours.max_position_embeddings,
        rms_norm_eps=ours.rms_norm_eps, tie_word_embeddings=False, attn_implementation=args.attn,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        return transformers.LlamaForCausalLM(config).to(dtype)


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


DECODE_PROFILE_ITERS = 5  # profiled decode steps (gpu_time_table runs 1 + 2 * this steps)


def decode_ms(
    model,
    prompt: torch.Tensor,
    warmup: int,
    steps: int,
    device: torch.device,
    static_cache: bool = False,
    profile_title: str | None = None,
) -> float | None:
    """Median latency of one greedy cached one-token step at B1 (after ``warmup`` untimed steps).

    ``static_cache`` (Kimi Linear): a :class:`~kimi_hf.KimiLinearStaticCache`, so that on CUDA the steps
    after the first are one CUDA-graph replay each (GPU-bound instead of host-bound).
    ``profile_title``: then also print the GPU time of a decode step (``gpu_time_table``, after the timed steps).
    """
    extra = 1 + 2 * DECODE_PROFILE_ITERS if profile_title else 0
    static = {}
    if static_cache and isinstance(model, KimiLinearForCausalLM):
        static = {CACHE_FIELD: KimiLinearStaticCache(model.config, prompt.shape[1] + warmup + steps + extra)}
    out = model(prompt, use_cache=True, **static)
    cache = _cache_of(out)
    token = out.logits[:, -1:].argmax(-1)

    def step():
        nonlocal token
        token = model(token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)

    times = []
    for i in range(warmup + steps):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    if profile_title:
        from _profile import gpu_time_table

        print(gpu_time_table(step, profile_title, iters=DECODE_PROFILE_ITERS, top=30), flush=True)
    return statistics.median(times) if times else None


def _memory(device: torch.device) -> float:
    return torch.cuda.memory_allocated() / 2**30 if device.type == "cuda" else 0.0


def bench_variant(
    model, impl: str | None, args, shape: tuple[int, int], device, timer, warm_only: bool = False
) -> dict:
    """Time one model with one depth-attention implementation (``impl=None``: leave the model as it is).

    ``warm_only``: run every path once (one step, one prefill, the decode warm-up), time nothing.
    """
    if impl is not None:
        configure_impl(model, impl, args.one_pass)
    vocab = model.config.vocab_size
    gen = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, vocab, shape, generator=gen).to(device)
    eps = getattr(model.config, "attn_res_eps", 1e-6)
    row: dict = {}
    with depth_attention_impl(impl or "torch", eps):
        model.train()

        def step():
            model(ids, labels=ids, use_cache=False).loss.backward()
            model.zero_grad(set_to_none=True)

        step()  # compiles; the second step is the one whose memory is read
        _sync(device)
        if device.type == "cuda" and not warm_only:
            torch.cuda.reset_peak_memory_stats()  # per configuration: the max of this step only
            before = _memory(device)
            loss = model(ids, labels=ids, use_cache=False).loss
            _sync(device)
            row["act_gib"] = _memory(device) - before  # what the forward keeps for the backward (+ the logits)
            loss.backward()
            model.zero_grad(set_to_none=True)
            del loss
            _sync(device)
            row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if not warm_only:
            row["train_ms"] = timer(step)
            if args.profile and device.type == "cuda":
                from _profile import gpu_time_table

                title = f"{model.config.model_type} {impl}: train step"
                print(gpu_time_table(step, title, iters=3, top=40), flush=True)
        model.eval()
        with torch.no_grad():
            model(ids, use_cache=False)  # warm-up (timer adds one more untimed call)
            if not warm_only:
                row["prefill_ms"] = timer(lambda: model(ids, use_cache=False))
                if args.profile and device.type == "cuda":
                    from _profile import gpu_time_table

                    title = f"{model.config.model_type} {impl}: prefill"
                    print(gpu_time_table(lambda: model(ids, use_cache=False), title, iters=3, top=25), flush=True)
            prompt = torch.randint(0, vocab, (1, args.decode_prompt), generator=gen).to(device)
            if warm_only:
                decode_ms(model, prompt, args.decode_warmup, 0, device, args.static_cache)
            else:
                title = f"{model.config.model_type} {impl}: decode" if args.profile and device.type == "cuda" else None
                row["decode_ms"] = decode_ms(
                    model, prompt, args.decode_warmup, args.decode_tokens, device, args.static_cache, title
                )
    return row


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def markdown(results: list[dict], header: dict) -> str:
    """Table of one model's rows; ratios against its first standard-residual row (the first baseline)."""
    base = next((r for r in results if r["residual"] == "standard" and "error" not in r), None)
    lines = [f"### AttnRes benchmark ({header['model']})", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()]
    if base:
        lines.append(f"- ratios (x std): against the standard residual with the '{base['impl']}' PreNorm")
    repeat = next((r for r in results if r.get("repeat") and "error" not in r), None)
    if base and repeat:
        drift = ", ".join(
            f"{key} {repeat[key] / base[key]:.3f}" for key in ("train_ms", "prefill_ms", "decode_ms") if base.get(key)
        )
        lines.append(f"- anchor measured twice (first / last row): repeat / first = {drift}")
    columns = ["residual", "implementation", "train step ms", "x std", "peak GiB", "x std", "activations GiB", "x std"]
    columns += ["prefill ms", "x std", "decode ms/token", "x std"]
    lines += ["", "| " + " | ".join(columns) + " |", "| --- | --- |" + " ---: |" * 10]
    for r in results:
        impl = r["impl"] + (" (repeat)" if r.get("repeat") else "")
        cells = [r["residual"], impl + (" (failed: see the log)" if "error" in r else "")]
        for key in ("train_ms", "peak_gib", "act_gib", "prefill_ms", "decode_ms"):
            value = r.get(key)
            ratio = value / base[key] if base and value is not None and base.get(key) else None
            cells += [_fmt(value), _fmt(ratio, ".3f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=list(MODELS), choices=MODELS, help="models, in this order")
    p.add_argument("--tiny", action="store_true", help="tiny configs on CPU (smoke test); times are not meaningful")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: dense 4, kimi_linear 2; tiny 2)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: dense 2048, kimi_linear 4096)")
    p.add_argument("--block-size", type=int, default=None, help="sublayers per block (default: dense 8 of 32, "
                   "kimi_linear 4 of 16; tiny 2)")  # fmt: skip
    p.add_argument("--modes", nargs="+", default=["standard", "block", "full"], choices=("standard", "block", "full"))
    p.add_argument("--baselines", nargs="+", default=list(BASELINES), choices=BASELINES,
                   help="PreNorm of the standard residual; the first is the anchor of the ratios")  # fmt: skip
    p.add_argument("--impls", nargs="+", default=["triton", "liger"], choices=IMPLS,
                   help="depth-attention implementations of Block/Full")  # fmt: skip
    p.add_argument("--llama-anchor", action=argparse.BooleanOptionalAction, default=True,
                   help="also time transformers' LlamaForCausalLM of the dense shape")  # fmt: skip
    p.add_argument("--attn", default="sdpa", help="attention implementation (sdpa, eager, ...)")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float32"), help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--reps", type=int, default=None, help="~timed calls of a 100 ms step (default 6; 2 tiny)")
    p.add_argument("--decode-prompt", type=int, default=None, help="decode prompt length (default 512; 8 tiny)")
    p.add_argument("--decode-warmup", type=int, default=None, help="untimed decode steps before the timed ones "
                   "(default 20: every cache length modulo 16; 2 tiny)")  # fmt: skip
    p.add_argument("--decode-tokens", type=int, default=None, help="timed decode steps (default 24; 3 tiny)")
    p.add_argument("--static-cache", action="store_true", help="Kimi Linear decodes with KimiLinearStaticCache "
                   "(CUDA graphs on CUDA); the dense model keeps its growing cache")  # fmt: skip
    p.add_argument("--warmup-pass", action=argparse.BooleanOptionalAction, default=True,
                   help="run every configuration once, untimed, before the timed passes")  # fmt: skip
    p.add_argument("--json", default=None, help="also write the results to this JSON file (rewritten after each row)")
    add_set_option(p, "attn_res.fused.BWD_SOURCE_TILE=4")
    p.add_argument("--one-pass", action="store_true", help="Block/Full inference (prefill, decode) through the "
                   "one-pass depth attention of training, not the two-phase path (AttentionResiduals.two_phase=False)")
    p.add_argument("--profile", action="store_true", help="after each timed training step, prefill and decode, print "
                   "its per-kernel GPU time and wall time (CUDA)")  # fmt: skip
    args = p.parse_args(argv)
    args.launch_constants = apply_set_option(p, args)
    tiny = args.tiny
    args.reps = args.reps or (2 if tiny else 6)
    args.decode_prompt = args.decode_prompt or (8 if tiny else 512)
    args.decode_warmup = args.decode_warmup or (2 if tiny else 20)
    args.decode_tokens = args.decode_tokens or (3 if tiny else 24)
    for name in ("batch", "seq", "block_size", "reps", "decode_prompt", "decode_warmup", "decode_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def _header(args, model_name: str, device: torch.device, dtype: torch.dtype) -> dict:
    batch, seq, block = shape_of(args, model_name)
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    if device.type == "cuda":
        versions += f", triton {__import__('triton').__version__}"
    return {
        "model": f"{model_name}{' tiny' if args.tiny else ' ~1B'}",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "versions": versions,
        "shape": f"B{batch} T{seq} {str(dtype).removeprefix('torch.')}, attention {args.attn}, block size {block} "
        f"sublayers; decode B1 after a {args.decode_prompt}-token prompt, median of {args.decode_tokens} steps"
        + (" (KimiLinearStaticCache)" if args.static_cache and model_name == "kimi_linear" else ""),
        "timing": "triton.testing.do_bench median, warmed up" if device.type == "cuda" else "perf_counter median",
        "launch_constants": args.launch_constants,
    }


def _passes(args, model_name: str, device: torch.device, impls: list[str]) -> list[list[tuple[str, str | None]]]:
    """(residual, impl) pairs of one model in two passes; impl None is transformers' Llama.

    The first pass holds the rows the targets are read from (the first baseline, the first impl); the main
    loop runs it for every model before any second pass (the other baselines and impls, the Llama anchor,
    then the first row again), so that a run cut short loses anchors rather than a model.
    """
    baselines = [b for b in args.baselines if b != "triton" or device.type == "cuda"] or ["torch"]
    first, second = [], []
    for residual in args.modes:
        if residual == "standard":
            first.append(("standard", baselines[0]))
            second += [("standard", b) for b in baselines[1:]]
            if model_name == "dense" and args.llama_anchor:
                second.append(("standard", None))
        else:
            first.append((residual, impls[0]))
            second += [(residual, impl) for impl in impls[1:]]
    if first:
        second.append(first[0])  # the repeat: same configuration, measured last
    return [first, second]


def run_variants(args, model_name: str, pairs, device, dtype, timer, report: dict, warm_only: bool = False) -> None:
    """Time ``pairs`` of one model; prints each row (JSON, flushed) as it finishes and rewrites ``--json``
    with ``report`` ({"headers": {model: header}, "results": [rows so far]}). ``warm_only``: the untimed
    warm-up pass (rows are printed with their wall time only, not recorded)."""
    batch, seq, _ = shape_of(args, model_name)
    model, built_for = None, None
    done = {(r["residual"], r["impl"]) for r in report["results"] if r["model"] == model_name}
    for residual, impl in pairs:
        row = {"model": model_name, "residual": residual, "impl": impl or LLAMA}
        if (residual, row["impl"]) in done and not warm_only:
            row["repeat"] = True
        start = time.perf_counter()
        try:
            if built_for != (residual, impl is None):
                model = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                if impl is None:
                    model = build_llama(args, device, dtype)
                else:
                    model = build_model(args, model_name, residual, device, dtype)
                built_for = (residual, impl is None)
            row.update(bench_variant(model, impl, args, (batch, seq), device, timer, warm_only))
        except torch.OutOfMemoryError:  # e.g. Full AttnRes with the stacking reference: report, go on
            row["impl"] += " (OOM)"
            model, built_for = None, None
            torch.cuda.empty_cache()
        except Exception as exc:  # one GPU run must still time the other variants: the row says what failed
            traceback.print_exc()
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            model, built_for = None, None
        row["wall_s"] = round(time.perf_counter() - start, 1)
        if warm_only:
            print(json.dumps(json_safe({**row, "warm-up": True}), allow_nan=False), flush=True)
            continue
        report["results"].append(row)
        print(json.dumps(json_safe(row), allow_nan=False), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(json_safe(report), f, indent=2, allow_nan=False)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    impls = list(args.impls)
    if "liger" in impls and (_liger_function() is None or device.type != "cuda"):
        print("liger-kernel's AttnRes op is not importable here (or no CUDA): skipping the 'liger' anchor", flush=True)
        impls.remove("liger")
    if "triton" in impls and device.type != "cuda":
        impls.remove("triton")  # Triton's interpreter would only time Python
    impls = impls or ["torch"]
    timer = _timer(device, args.reps)
    report: dict = {"headers": {m: _header(args, m, device, dtype) for m in args.model}, "results": []}
    passes = {m: _passes(args, m, device, impls) for m in args.model}
    if args.warmup_pass:
        for model_name in args.model:
            print(f"== {model_name}, untimed warm-up of every configuration", flush=True)
            pairs = [pair for one_pass in passes[model_name] for pair in one_pass]
            run_variants(args, model_name, list(dict.fromkeys(pairs)), device, dtype, timer, report, warm_only=True)
    for index in range(2):
        for model_name in args.model:
            print(f"== {model_name}, pass {index + 1}", flush=True)
            run_variants(args, model_name, passes[model_name][index], device, dtype, timer, report)
    for model_name in args.model:
        rows = [r for r in report["results"] if r["model"] == model_name]
        print(markdown(rows, report["headers"][model_name]), flush=True)
    return report["results"]


if __name__ == "__main__":
    main()
