"""Benchmark CE-LoRA's approximate frozen-weight backward against PEFT LoRA's exact one.

Two parts, printed as markdown tables (GPU, versions, shapes, medians, ratios vs anchors measured in the
same run):

1. Per layer, ``dX`` through a frozen ``W [O, I]`` for ``T`` tokens: PEFT LoRA's dense ``dY W`` (the
   anchor), kimi_hf's packed backward (Triton packing pass + one GEMM, also timed apart), and the public
   code's approach (gather ``dY`` columns and ``W`` rows, then dense GEMMs) as a second anchor. "FLOP
   bound" is the dense time scaled by the FLOP fraction CE-LoRA keeps, ``ratio + r/I + r/O``; "of bound"
   = bound / measured. The packing pass's memory floor is its bytes (read ``dY``, write ``G``) at
   ``--hbm-tbps`` (default 4.0 TB/s, about what an H200 copy kernel reaches).
2. A full training step (forward + backward, no optimizer, bf16) of a ~0.9B Llama with LoRA on all seven
   projections, with and without gradient checkpointing, for both adapter dtypes of ``get_peft_model``:
   fp32 adapters (``autocast_adapter_dtype=True``, PEFT's default: LoRA's branch runs in fp32) and bf16
   adapters (``False``). Within one group every row computes in the same dtypes, and the gain splits in two:
   "kimi_hf layer, exact dX" is our layer at ratio 1.0 -- LoRA's exact math, same FLOPs -- so its gain over
   PEFT LoRA is implementation (LoRA's branch added inside the base GEMM's output, LoRA's dX inside the
   backward GEMM, ``x`` saved once instead of also as an fp32 copy); the CE-LoRA rows' gain over it
   ("vs exact layer") is what CE-LoRA's approximate backward itself buys.

Every result is also printed as one JSON line (``{"part": ...}``) the moment it is measured, and
``--json`` is rewritten after each one, so a run cut short keeps what it measured. With one adapter dtype
the run finishes within 6 minutes on a fresh H200, Triton compilation included (three autotune configs;
short ``do_bench`` windows; 8 timed model steps per setting); both dtypes double the model part.

``--tiny`` runs a CPU smoke test (torch reference path, tiny shapes and model, wall-clock medians).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import time
from collections.abc import Callable

import torch
from _profile import json_safe

from kimi_hf.cli import positive_int
from kimi_hf.kernels._launch import add_set_option, apply_set_option

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]  # (out, in): q/o-like, down_proj, up/gate-like
RATIOS = [0.25, 0.5, 0.65, 1.0]
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# get_peft_model's autocast_adapter_dtype per group: PEFT's default keeps bf16 models' adapters in fp32
ADAPTER_DTYPES = {"fp32": True, "bf16": False}
EXACT_LAYER = "kimi_hf layer, exact dX (ratio 1.0)"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per layer backward (default 16384)")
    parser.add_argument("--ratios", type=float, nargs="+", default=RATIOS, help="keep ratios to time per layer")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank r; the SVD rank is 7r/8 (default 16)")
    parser.add_argument("--batch", type=positive_int, default=4, help="model step batch size (default 4; --tiny: 2)")
    parser.add_argument("--seq", type=positive_int, default=2048,
                        help="model step sequence length (default 2048; --tiny: 64)")  # fmt: skip
    parser.add_argument("--steps", type=positive_int, default=8,
                        help="timed model steps per setting (default 8; --tiny: 2)")  # fmt: skip
    parser.add_argument("--hbm-tbps", type=float, default=4.0, help="bandwidth of the memory floor (TB/s)")
    parser.add_argument("--adapter-dtypes", nargs="+", choices=sorted(ADAPTER_DTYPES), default=list(ADAPTER_DTYPES),
                        help="model-step groups: fp32 adapters (PEFT's default) and/or bf16 adapters")
    parser.add_argument("--checkpointing", choices=["off", "on", "both"], default="both",
                        help="model-step groups without and/or with gradient checkpointing (default both)")
    parser.add_argument("--settings", nargs="+", default=[], metavar="WORD",
                        help="model steps: only the settings whose name contains one of these words (default all)")
    parser.add_argument("--profile", action="store_true",
                        help="model steps: once every setting of a group is timed, rebuild each and print its GPU "
                        "time per step and its kernels by GPU time (torch profiler; CUDA only)")
    parser.add_argument("--profile-host", type=int, default=0, metavar="N",
                        help="with --profile: also list the N host operators with the most self and total CPU time, "
                        "the N Python functions with the most time, and the step's synchronising calls")
    parser.add_argument("--liger", action="store_true",
                        help="model steps: Liger-Kernel's fused Llama ops (RMSNorm, RoPE, SwiGLU, fused linear cross "
                        "entropy) in the base model of every setting, so that its elementwise passes shrink")
    parser.add_argument("--skip-layers", action="store_true", help="skip the per-layer part")
    parser.add_argument("--skip-model", action="store_true", help="skip the model-step part")
    parser.add_argument("--json", type=str, default=None, help="also write all results to this JSON file")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny shapes and model, torch path")
    add_set_option(parser, "ce_lora.pack.SHARES=1")
    args = parser.parse_args()
    args.launch_constants = apply_set_option(parser, args)
    return args


def bench(fn: Callable[[], object], device: torch.device) -> float:
    """Median milliseconds of ``fn``: triton's do_bench on CUDA, a wall-clock median on CPU."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def environment(device: torch.device) -> dict[str, str]:
    import peft
    import transformers

    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = "absent"
    return env


class Recorder:
    """Collects result rows; prints each as a JSON line at once and rewrites ``--json`` after each."""

    def __init__(self, env: dict, path: str | None) -> None:
        self.results: dict = {"environment": env, "layers": [], "host": [], "model_steps": []}
        self.path = path
        print(json.dumps(json_safe({"part": "environment", **env}), allow_nan=False), flush=True)

    def add(self, part: str, row: dict) -> None:
        self.results[part].append(row)
        print(json.dumps(json_safe({"part": part, **row}), allow_nan=False), flush=True)
        if self.path:
            with open(self.path, "w") as f:
                json.dump(json_safe(self.results), f, indent=2, allow_nan=False)


def layer_rows(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, record: Recorder) -> None:
    from kimi_hf.kernels.ce_lora import (
        ce_grad_input,
        ce_pack_grad_output,
        channel_scores,
        kept_channels,
        low_rank_factors,
        make_plan,
        residual_row_norms,
        select_channels,
    )
    from kimi_hf.peft import CELoraConfig

    shapes = [(256, 192), (192, 512)] if args.tiny else SHAPES
    svd_rank = CELoraConfig().svd_rank_for(args.rank)  # CE-LoRA's default, 7r/8
    elem = torch.finfo(dtype).bits // 8
    for out_features, in_features in shapes:
        torch.manual_seed(0)
        weight = torch.randn(out_features, in_features, device=device, dtype=dtype) / math.sqrt(in_features)
        grad_out = torch.randn(args.tokens, out_features, device=device, dtype=dtype)
        b0, a0 = low_rank_factors(weight, svd_rank)
        row_norms = residual_row_norms(weight, b0, a0)
        scores = channel_scores(grad_out, row_norms, "activation_aware")
        b0c, a0c = b0.to(dtype), a0.to(dtype)
        dense_ms = bench(lambda: grad_out @ weight, device)
        for ratio in args.ratios:
            keep = kept_channels(out_features, ratio, svd_rank)
            row = {"out": out_features, "in": in_features, "tokens": args.tokens, "ratio": ratio, "dense_ms": dense_ms}
            kept_flops = 1.0 if keep is None else ratio + svd_rank / in_features + svd_rank / out_features
            row["bound_ms"] = dense_ms * kept_flops
            if keep is None:  # CE-LoRA runs the exact GEMM itself
                row.update(kept=out_features, ce_ms=dense_ms, pack_ms=0.0, gemm_ms=dense_ms, pack_floor_ms=0.0)
            else:
                plan = make_plan(weight, b0, a0, select_channels(scores, keep), dtype)
                packed = ce_pack_grad_output(grad_out, plan)
                width = packed.shape[1]
                if device.type == "cuda":
                    from kimi_hf.kernels.ce_lora.pack import _ce_pack_tuned, forced_config

                    row["pack_config"] = str(forced_config() or _ce_pack_tuned.best_config)
                row.update(
                    kept=keep,
                    ce_ms=bench(lambda: ce_grad_input(grad_out, plan), device),
                    pack_ms=bench(lambda: ce_pack_grad_output(grad_out, plan), device),
                    gemm_ms=bench(lambda: packed @ plan.stack, device),
                    # read dY once, write G once (B0 and the index are negligible)
                    pack_floor_ms=args.tokens * (out_features + width) * elem / (args.hbm_tbps * 1e9),
                )
                del packed
            index = select_channels(scores, min(out_features, math.ceil(ratio * out_features)))
            row["gather_ms"] = bench(
                lambda: (grad_out @ b0c) @ a0c
                + grad_out.index_select(1, index) @ (weight.index_select(0, index) - b0c.index_select(0, index) @ a0c),
                device,
            )
            row["speedup_vs_dense"] = dense_ms / row["ce_ms"]
            row["speedup_vs_gather"] = row["gather_ms"] / row["ce_ms"]
            row["of_bound"] = row["bound_ms"] / row["ce_ms"]
            row["pack_of_floor"] = row["pack_floor_ms"] / row["pack_ms"] if row["pack_ms"] else None
            record.add("layers", row)


class _Projection(torch.nn.Module):
    """One ``nn.Linear`` as a model for ``get_peft_model`` (host-cost rows)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(size, size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def host_rows(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, record: Recorder) -> None:
    """Host time of one adapted projection's forward + backward: tiny inputs, so that the launches and Python are
    what is timed (wall time of back-to-back calls, one synchronisation at the end). A training step is host-bound
    when this, summed over its projections, nears its GPU time."""
    from peft import LoraConfig, get_peft_model

    from kimi_hf.peft import CELoraConfig

    size, rows, calls = (256, 8, 20) if args.tiny else (2048, 64, 300)
    common = dict(r=args.rank, lora_alpha=2 * args.rank, target_modules=["proj"])
    settings = [("PEFT LoRA", LoraConfig(**common)), (EXACT_LAYER, CELoraConfig(ce_ratio=1.0, **common)),
                ("CE-LoRA 0.5", CELoraConfig(ce_ratio=0.5, **common))]  # fmt: skip
    x = torch.randn(rows, size, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(rows, size, device=device, dtype=dtype)
    for adapters, autocast_adapter_dtype in ADAPTER_DTYPES.items():
        for name, config in settings:
            torch.manual_seed(0)
            model = get_peft_model(_Projection(size).to(device=device, dtype=dtype), config,
                                   autocast_adapter_dtype=autocast_adapter_dtype).train()  # fmt: skip

            def call() -> None:
                model(x).backward(grad)

            for _ in range(3):  # factorisation, selection, compilation
                call()
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(calls):
                call()
            if device.type == "cuda":
                torch.cuda.synchronize()
            host_us = (time.perf_counter() - start) / calls * 1e6
            record.add("host", {"setting": name, "adapters": adapters, "size": size, "rows": rows, "host_us": host_us})


def build_llama(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.tiny:
        config = LlamaConfig(
            vocab_size=512, hidden_size=256, intermediate_size=704, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2,
        )
    else:  # the ~0.89B Llama of REFERENCE.md's CE-LoRA anchors
        config = LlamaConfig(
            vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
            num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=args.seq,
        )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with device:  # initialise on the device: a CPU init of 0.9B parameters takes far longer than the timing
        return LlamaForCausalLM(config).to(dtype=dtype)


def _train_step(model, ids: torch.Tensor) -> Callable[[], None]:
    """One training step: forward + backward of the LM loss, no optimizer, gradients dropped."""

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        for p in model.parameters():
            p.grad = None

    return step


def _step_times_ms(step: Callable[[], None], steps: int, device: torch.device) -> list[float]:
    """Wall times (ms) of ``steps`` calls of ``step`` after three untimed ones; CUDA's peak-memory counter is reset
    after those."""
    # the first CE-LoRA backward factorises and is exact; the second autotunes the packing kernel
    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def model_rows(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, record: Recorder) -> None:
    from peft import LoraConfig, get_peft_model

    from kimi_hf.peft import PAPER_RATIOS, CELoraConfig

    common = dict(r=args.rank, lora_alpha=2 * args.rank, target_modules=PROJECTIONS)
    settings = [  # anchors first, so that a run cut short still has them
        ("PEFT LoRA", LoraConfig(**common)),
        # LoRA's exact math in our layer: its gain over PEFT LoRA is implementation, not CE-LoRA
        (EXACT_LAYER, CELoraConfig(ce_ratio=1.0, **common)),
        ("CE-LoRA paper ratios", CELoraConfig(ce_ratio=dict(PAPER_RATIOS), **common)),
        ("CE-LoRA 0.5 everywhere", CELoraConfig(ce_ratio=0.5, **common)),
    ]
    if args.liger:  # patches transformers' Llama classes, before any model is built: every setting gets them
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama()
    batch, seq = (2, 64) if args.tiny else (args.batch, args.seq)
    checkpointing_modes = {"off": (False,), "on": (True,), "both": (False, True)}[args.checkpointing]
    groups = [(c, a) for a in args.adapter_dtypes for c in checkpointing_modes]
    chosen = [(n, c) for n, c in settings if not args.settings or any(word in n for word in args.settings)]

    def build(config, checkpointing: bool, adapters: str):
        model = build_llama(args, device, dtype)
        model = get_peft_model(model, config, autocast_adapter_dtype=ADAPTER_DTYPES[adapters])
        if checkpointing:
            model.base_model.model.gradient_checkpointing_enable({"use_reentrant": False})
            model.enable_input_require_grads()
        model.train()
        ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=device)
        return model, _train_step(model, ids)

    def release() -> None:  # after the caller's `del`: free a model before the next one's peak memory
        gc.collect()  # PEFT wrappers hold reference cycles
        if device.type == "cuda":
            torch.cuda.empty_cache()

    for checkpointing, adapters in groups:
        anchor = exact = None
        for name, config in chosen:
            model, step = build(config, checkpointing, adapters)
            ms = statistics.median(_step_times_ms(step, 2 if args.tiny else args.steps, device))
            anchor = ms if name == "PEFT LoRA" else anchor
            exact = ms if name == EXACT_LAYER else exact
            adapter_dtype = str(next(p for p in model.parameters() if p.requires_grad).dtype).removeprefix("torch.")
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
            record.add("model_steps", {"setting": name, "adapters": adapter_dtype, "checkpointing": checkpointing,
                                       "liger": args.liger, "batch": batch, "seq": seq, "step_ms": ms,
                                       "speedup_vs_lora": anchor / ms if anchor is not None else None,
                                       "speedup_vs_exact_layer": exact / ms if exact is not None else None,
                                       "peak_gib": peak, "tokens_per_s": batch * seq / ms * 1e3})  # fmt: skip
            del model, step
            release()
        if not (args.profile and device.type == "cuda"):
            continue
        from _profile import gpu_time_table

        # Profiled once every setting of the group is timed, so that no wall time above follows a profiler session in
        # this process. Until session 49 every setting's but the first's did, and those (CE-LoRA's) were the ones whose
        # wall time exceeded their GPU time. gpu_time_table's own wall time, taken after such a session, shows whether
        # one slows the launches that follow it.
        for name, config in chosen:
            model, step = build(config, checkpointing, adapters)
            title = f"{name}, {adapters} adapters, checkpointing {checkpointing}"
            print(gpu_time_table(step, title, iters=3, top=25, host_top=args.profile_host), flush=True)
            del model, step
            release()


def _percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.0f}%"


def print_tables(env: dict, layers: list[dict], host: list[dict], models: list[dict]) -> None:
    print("## CE-LoRA benchmark\n")
    print(" | ".join(f"{k} {v}" for k, v in env.items()) + "\n")
    if layers:
        print("### Frozen-weight backward dX = dY W, per layer (median ms)\n")
        print("| O x I | T | ratio | kept | PEFT LoRA dense | gather (public code) | kimi_hf CE | pack | GEMM |"
              " pack floor | pack of floor | vs dense | vs gather | FLOP bound | of bound |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in layers:
            print(f"| {r['out']}x{r['in']} | {r['tokens']} | {r['ratio']} | {r['kept']} | {r['dense_ms']:.3f} |"
                  f" {r['gather_ms']:.3f} | {r['ce_ms']:.3f} | {r['pack_ms']:.3f} | {r['gemm_ms']:.3f} |"
                  f" {r['pack_floor_ms']:.3f} | {_percent(r['pack_of_floor'])} | {r['speedup_vs_dense']:.2f}x |"
                  f" {r['speedup_vs_gather']:.2f}x | {r['bound_ms']:.3f} | {100 * r['of_bound']:.0f}% |")
        print()
    if host:
        print("### Host time of one adapted projection, forward + backward (us per call, tiny inputs)\n")
        print("| setting | adapters | size | rows | host us |")
        print("|---|---|---|---|---|")
        for r in host:
            print(f"| {r['setting']} | {r['adapters']} | {r['size']} | {r['rows']} | {r['host_us']:.1f} |")
        print()
    if models:
        liger = " (base model with Liger-Kernel's fused ops)" if any(r.get("liger") for r in models) else ""
        print(f"### Training step (forward + backward, no optimizer), ~0.9B Llama{liger}, LoRA r16 on 7 projections\n")
        print("Rows of one group (adapter dtype x checkpointing) compute in the same dtypes. 'vs PEFT LoRA' of the"
              " exact layer = implementation only (same math and FLOPs); 'vs exact layer' = CE-LoRA's approximate"
              " backward alone.\n")
        print("| setting | adapters | grad. checkpointing | B x T | step ms | tokens/s | vs PEFT LoRA |"
              " vs exact layer | peak GiB |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in models:
            vs_exact = "-" if r["speedup_vs_exact_layer"] is None else f"{r['speedup_vs_exact_layer']:.3f}x"
            vs_lora = "-" if r["speedup_vs_lora"] is None else f"{r['speedup_vs_lora']:.3f}x"
            print(f"| {r['setting']} | {r['adapters']} | {r['checkpointing']} | {r['batch']}x{r['seq']} |"
                  f" {r['step_ms']:.1f} | {r['tokens_per_s']:.0f} | {vs_lora} | {vs_exact} |"
                  f" {r['peak_gib']:.1f} |")


def main() -> None:
    args = parse_args()
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.tiny:
        raise SystemExit("no CUDA device: use --tiny for the CPU smoke test")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    if args.tiny:
        args.tokens = min(args.tokens, 256)
    record = Recorder(dict(environment(device), launch_constants=args.launch_constants), args.json)
    if not args.skip_layers:
        layer_rows(args, device, dtype, record)
        host_rows(args, device, dtype, record)
    if not args.skip_model:
        model_rows(args, device, dtype, record)
    results = record.results
    print_tables(results["environment"], results["layers"], results["host"], results["model_steps"])


if __name__ == "__main__":
    main()
