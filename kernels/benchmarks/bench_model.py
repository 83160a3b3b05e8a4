"""Model-level speed of kimi_hf's KimiLinearForCausalLM against transformers' native class (with fla).

On the reference ~1B MoE Kimi Linear config of REFERENCE.md (hidden 2048, 8 layers: KDA at 1,2,3,5,6,7 and
MLA at 4,8; 16 experts top-4; vocab 32000; sdpa; bf16), in one run:

- training step (forward + backward with the LM loss, no optimizer) at B2 T4096 and B1 T2048;
- greedy decoding at B1 (512-token prompt, 64 new tokens: ms per new token) and B32 throughput; ours both
  with its growing cache and with ``KimiLinearStaticCache`` (CUDA graphs), the native class with its own;
- a parity check of the logits of both classes on the same weights, in fp32: in bf16 a randomly initialised
  MoE flips expert choices on rounding (our own model in bf16 differs from itself in fp32 by ~10% in logits),
  so bf16 logits cannot tell a bug from rounding.

Medians of ``triton.testing.do_bench`` (training) and of repeated timed ``generate`` calls (decoding).
Prints a markdown table (GPU, versions, ratios) and optionally writes JSON. ``--set`` overrides integer launch
constants of ``kimi_hf.kernels`` for the run, e.g. ``--set moe.GATE_UP_SPLIT=4 kda.chunk.FLAGGED_WARPS=2``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import torch
from _profile import json_safe

from kimi_hf import GraphedLossStep
from kimi_hf.cli import positive_int
from kimi_hf.kernels._launch import add_set_option, apply_set_option


def reference_config(tiny: bool = False):
    """The ~1B MoE config of REFERENCE.md (or a CPU-sized one with ``tiny``)."""
    from kimi_hf import KimiLinearConfig

    if tiny:
        return KimiLinearConfig(
            vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, num_experts=4,
            num_experts_per_token=2, moe_intermediate_size=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            linear_attn_config={"kda_layers": [1, 2, 3], "full_attn_layers": [4], "num_heads": 2, "head_dim": 32},
        )  # fmt: skip
    return KimiLinearConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=8, num_attention_heads=16,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, num_experts=16,
        num_experts_per_token=4, moe_intermediate_size=1024, num_shared_experts=1, first_k_dense_replace=1,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
        linear_attn_config={
            "kda_layers": [1, 2, 3, 5, 6, 7], "full_attn_layers": [4, 8], "num_heads": 16, "head_dim": 128,
            "short_conv_kernel_size": 4,
        },
    )  # fmt: skip


def _median_ms(fn, device: torch.device, reps: int) -> float:
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=3, rep=reps, return_mode="median")
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def train_step(model, batch: int, seq_len: int, device: torch.device):
    """A training step (forward + backward with the LM loss on random ids) as a closure; puts ``model`` in train
    mode."""
    ids = torch.randint(3, model.config.vocab_size, (batch, seq_len), device=device)
    model.train()

    def step():
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()

    return step


def train_step_ms(model, batch: int, seq_len: int, device: torch.device, reps: int) -> tuple[float, float]:
    """Median ms of forward+backward with labels, and peak memory (GiB) during it."""
    step = train_step(model, batch, seq_len, device)
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    ms = _median_ms(step, device, reps)
    model.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return ms, peak


def graphed_train_step_ms(model, batch: int, seq_len: int, device: torch.device, reps: int) -> float:
    """Median ms of the same training step replayed from a CUDA graph (:class:`kimi_hf.GraphedLossStep`)."""
    ids = torch.randint(3, model.config.vocab_size, (batch, seq_len), device=device)
    model.train()
    model.zero_grad(set_to_none=True)
    batch_tensors = {"input_ids": ids, "labels": ids}
    step = GraphedLossStep(model, batch_tensors, forward_kwargs={"use_cache": False})
    ms = _median_ms(lambda: step(batch_tensors), device, reps)
    model.zero_grad(set_to_none=True)
    return ms


@torch.no_grad()
def greedy_generate(model, ids: torch.Tensor, new: int, **kwargs) -> None:
    """Greedy ``generate`` of exactly ``new`` tokens after the prompt ``ids`` ``[B, P]`` (no end-of-sequence stop);
    ``kwargs`` go to ``generate`` (e.g. a static cache)."""
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                   do_sample=False, pad_token_id=0, eos_token_id=None, **kwargs)  # fmt: skip


@torch.no_grad()
def decode_ms_per_token(
    model, batch: int, prompt: int, new: int, device: torch.device, repeats: int, static_cache: bool = False
) -> float:
    """(time(generate new tokens) - time(generate 1 token)) / (new - 1), median over ``repeats``.

    ``static_cache``: ours with a :class:`~kimi_hf.KimiLinearStaticCache` (CUDA graphs on CUDA), one cache
    reused (``reset()``) by every call, so that the graph is captured in the untimed warm-up call.
    """
    model.eval()
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt), device=device)
    kwargs = {}
    cache = None
    if static_cache:
        from kimi_hf import KimiLinearStaticCache
        from kimi_hf.models.kimi_linear.modeling_kimi_linear import CACHE_FIELD

        cache = KimiLinearStaticCache(model.config, max_cache_len=prompt + new)
        kwargs[CACHE_FIELD] = cache

    def timed(n: int) -> float:
        if cache is not None:
            cache.reset()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        greedy_generate(model, ids, n, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    timed(new)  # warm-up over every cache length the timed runs see (compilation, autotuning, allocator)
    samples = [(timed(new) - timed(1)) * 1e3 / (new - 1) for _ in range(repeats)]
    return statistics.median(samples)


def _versions() -> dict:
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "python": sys.version.split()[0]}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    try:
        import fla

        info["fla"] = getattr(fla, "__version__", "installed")
    except ImportError:
        info["fla"] = "not installed"
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def load_native(path: str, dtype: torch.dtype, device: torch.device):
    """transformers' native KimiLinearForCausalLM on the weights saved at ``path`` (None if unavailable)."""
    try:
        from transformers.models.kimi_linear import KimiLinearForCausalLM as NativeKimiLinear
    except ImportError:
        return None
    return NativeKimiLinear.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device)


def run(args: argparse.Namespace) -> dict:
    from kimi_hf import KimiLinearForCausalLM

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    config = reference_config(args.tiny)
    config._attn_implementation = "sdpa"
    ours = KimiLinearForCausalLM(config).to(device=device)
    results: dict = {"versions": _versions(), "parameters": sum(p.numel() for p in ours.parameters()), "rows": []}

    skip_native = args.skip_native
    if device.type == "cpu" and results["versions"]["fla"] != "not installed" and not skip_native:
        # transformers' native class calls fla's Triton kernels whenever fla is importable; they need a GPU.
        print("native class skipped: fla is installed and there is no GPU for its Triton kernels", flush=True)
        skip_native = True
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(tmp)
        # Loaded onto the CPU, and moved to the GPU only while it is measured: there its fp32 weights (4 GiB) would
        # count in our peak memory.
        native = None if skip_native else load_native(tmp, torch.float32, torch.device("cpu"))

    if native is not None and args.parity:
        ids = torch.randint(3, config.vocab_size, (1, 256 if not args.tiny else 32), device=device)
        with torch.no_grad():
            a, b = ours.eval()(ids).logits.double(), native.to(device).eval()(ids).logits.double()
        native.cpu()
        results["parity_rel_err"] = ((a - b).norm() / b.norm()).item()
        print(f"parity (fp32) rel err {results['parity_rel_err']:.2e}", flush=True)
    ours.to(dtype)

    train_shapes = [(1, 64)] if args.tiny else [(2, 4096), (1, 2048)]
    prompt, new = (16, 8) if args.tiny else (args.decode_prompt, 64)
    decode_batches = [1, 4] if args.tiny else [1, 32]

    def profile(model, label: str) -> None:
        """The GPU time of ``model``'s training step and growing-cache decoding, by kernel (``--profile``)."""
        from _profile import gpu_time_table

        for batch, seq_len in train_shapes if "train" in args.parts else []:
            step = train_step(model, batch, seq_len, device)
            title = f"{label}: train step B{batch} T{seq_len}"
            print(gpu_time_table(step, title, iters=3, top=30, host_top=args.profile_host), flush=True)
            model.zero_grad(set_to_none=True)
        if "decode" in args.parts:
            # The growing cache's decoding is host-bound: with --profile-host, where its host time goes.
            title = f"{label}: greedy decode B1, prompt {prompt}, {new} new tokens, growing cache (one generate)"
            model.eval()
            ids = torch.randint(3, config.vocab_size, (1, prompt), device=device)
            generate = lambda: greedy_generate(model, ids, new)  # noqa: E731
            print(gpu_time_table(generate, title, iters=2, top=15, host_top=args.profile_host), flush=True)

    def measure(model, label: str, static_cache: bool = False, graph: bool = False) -> dict:
        """Every timing of one model, printed as it finishes (a run cut short keeps what it measured)."""
        out = {}
        for batch, seq_len in train_shapes if "train" in args.parts else []:
            out[("train", batch, seq_len)] = train_step_ms(model, batch, seq_len, device, args.rep)
            print(f"{label}: train step B{batch} T{seq_len}: {out[('train', batch, seq_len)][0]:.2f} ms", flush=True)
            if graph and device.type == "cuda":
                out[("train_graph", batch, seq_len)] = graphed_train_step_ms(model, batch, seq_len, device, args.rep)
                ms = out[("train_graph", batch, seq_len)]
                print(f"{label}: train step B{batch} T{seq_len}, CUDA graph: {ms:.2f} ms", flush=True)
        for batch in decode_batches if "decode" in args.parts else []:
            for static in (True, False) if static_cache else (False,):
                key = ("decode_static" if static else "decode", batch)
                out[key] = decode_ms_per_token(model, batch, prompt, new, device, args.decode_repeats, static)
                kind = "static cache + CUDA graphs" if static else "growing cache"
                print(f"{label}: greedy decode B{batch}, {kind}: {out[key]:.2f} ms/token", flush=True)
        return out

    # Ours first, then the native class, so that a run cut short (the native path's first calls autotune
    # fla's kernels) still has our numbers.
    mine = measure(ours, "ours", static_cache=True, graph=args.graph)
    ours.cpu()
    theirs = measure(native.to(device=device, dtype=dtype), "native") if native is not None else {}
    if args.profile and device.type == "cuda":
        # After every timing: a profiler session can leave CUPTI's launch callbacks attached to the process
        # (pytorch/pytorch#144455), and until session 49 each model was timed after one (its own, and ours before the
        # native class's), on steps that are host-bound at B1.
        if native is not None:
            native.cpu()
        profile(ours.to(device), "ours")
        if native is not None:
            ours.cpu()
            profile(native.to(device), "native")

    def add(name: str, ours_value: float, native_value: float | None, unit: str, extra: str = "") -> None:
        # speedup > 1: ours is better (times: lower is better; throughputs: higher is better)
        higher_is_better = unit in ("Ktok/s", "tok/s")
        ratio = None
        if native_value:
            ratio = ours_value / native_value if higher_is_better else native_value / ours_value
        results["rows"].append(
            {"measure": name, "ours": ours_value, "native": native_value, "unit": unit, "speedup": ratio, "note": extra}
        )

    for key, value in mine.items():
        other = theirs.get(key)
        if key[0] == "train_graph":  # ratio against the native class's eager step
            _, batch, seq_len = key
            native_ms = (theirs.get(("train", batch, seq_len)) or (None,))[0]
            add(f"train step B{batch} T{seq_len}, CUDA graph (GraphedLossStep)", value, native_ms, "ms",
                "native: eager")  # fmt: skip
        elif key[0] == "train":
            (ms, peak), (_, batch, seq_len) = value, key
            native_ms, native_peak = other if other else (None, None)
            note = f"peak {peak:.1f} GiB" + (f" vs {native_peak:.1f} GiB" if native_peak else "")
            add(f"train step B{batch} T{seq_len}", ms, native_ms, "ms", note)
            tokens = batch * seq_len
            native_tput = tokens / native_ms if native_ms else None
            add(f"train throughput B{batch} T{seq_len}", tokens / ms, native_tput, "Ktok/s")
        else:  # decoding; ratios against the native class's growing-cache decoding
            kind, batch = key
            other = theirs.get(("decode", batch))
            note = (
                "growing cache"
                if kind == "decode"
                else "static cache" + (" + CUDA graphs" if device.type == "cuda" else "")
            )
            add(f"greedy decode B{batch} (prompt {prompt})", value, other, "ms/token", note)
            tput = batch * 1e3 / other if other else None
            add(f"decode throughput B{batch}", batch * 1e3 / value, tput, "tok/s", note)
    return results


def markdown(results: dict) -> str:
    v = results["versions"]
    lines = [
        f"GPU: {v.get('gpu', 'none (CPU)')}; torch {v['torch']}, triton {v.get('triton', '-')}, "
        f"transformers {v['transformers']}, fla {v['fla']}; {results['parameters'] / 1e9:.2f}B parameters",
    ]
    if results.get("launch_constants"):
        lines.append("Launch constants set: " + ", ".join(f"{k}={v}" for k, v in results["launch_constants"].items()))
    if "parity_rel_err" in results:
        err = results["parity_rel_err"]
        lines.append(f"Logits parity ours vs native (fp32, same weights): relative error {err:.2e}")
    lines += ["", "| measure | ours | native | unit | ours vs native | note |", "|---|---|---|---|---|---|"]
    for r in results["rows"]:
        native = f"{r['native']:.2f}" if r["native"] else "-"
        speed = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
        lines.append(f"| {r['measure']} | {r['ours']:.2f} | {native} | {r['unit']} | {speed} | {r['note']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="CPU-sized smoke run")
    parser.add_argument("--skip-native", action="store_true", help="do not time transformers' native class")
    parser.add_argument("--parity", action=argparse.BooleanOptionalAction, default=True,
                        help="check the fp32 logits against the native class (compiles fp32 kernels)")  # fmt: skip
    parser.add_argument("--parts", nargs="+", choices=("train", "decode"), default=["train", "decode"],
                        help="what to time (default: both)")  # fmt: skip
    parser.add_argument("--rep", type=positive_int, default=200,
                        help="do_bench time budget per training measurement (ms)")  # fmt: skip
    parser.add_argument("--decode-repeats", type=positive_int, default=3)
    parser.add_argument("--decode-prompt", type=positive_int, default=512,
                        help="prompt tokens before the timed decoding (default 512, the issue's setting)")
    parser.add_argument("--mla-latent-min-keys", type=positive_int, default=None, metavar="N",
                        help="our MLA decode steps attend in the latent space from N cached positions (default: the "
                        "model's MLA_ABSORB_MIN_KEYS, 4096); a larger N than the cache keeps the expanded form")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--profile", action="store_true",
                        help="print each model's per-kernel GPU time and wall time per training shape, and of one "
                        "greedy generate with the growing cache")  # fmt: skip
    parser.add_argument("--graph", action="store_true",
                        help="also time our training step replayed from a CUDA graph (kimi_hf.GraphedLossStep)")
    parser.add_argument("--profile-host", type=int, default=0, metavar="N",
                        help="with --profile: also list the N host operators with the most self CPU time")  # fmt: skip
    add_set_option(parser, "moe.GATE_UP_SPLIT=4")
    args = parser.parse_args(argv)
    overrides = apply_set_option(parser, args)
    if args.mla_latent_min_keys is not None:
        from kimi_hf.models.kimi_linear import modeling_kimi_linear

        modeling_kimi_linear.MLA_ABSORB_MIN_KEYS = args.mla_latent_min_keys
        overrides["MLA_ABSORB_MIN_KEYS"] = args.mla_latent_min_keys
    results = run(args)
    results["launch_constants"] = overrides
    print(markdown(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(json_safe(results), f, indent=2, allow_nan=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
