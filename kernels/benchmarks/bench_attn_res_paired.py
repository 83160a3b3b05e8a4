"""Block AttnRes against the standard residual in GPU time, measured in interleaved pairs.

Why a second AttnRes benchmark: the overhead targets (training <= 3%, inference <= 2%) are a few percent of a step,
and two measurements of one configuration moved by about as much in ``bench_attn_res.py``'s runs (BENCHMARKS.md,
sessions 8-11: the LM head's GEMV took 0.151-0.167 ms per decoded token in three measurements of models whose LM
heads are the same; whole dense prefills drifted by several percent). That script measures each configuration once
or twice, in sequence. Here both models stay in memory and are measured alternately, standard then Block in even
repetitions and Block then standard in odd ones, ``--reps`` times: every repetition gives one ratio, and the median
ratio with its range says how large the overhead is and how far the noise reaches.

Per model and repetition, the GPU time (the sum of the kernels' durations, torch profiler, ``--calls`` calls) of a
training step (forward + backward of the LM loss, no optimizer), a prefill (forward without cache, no_grad) and a
cached one-token decode step at B1 (after a ``--decode-prompt``-token prompt; Kimi Linear through
``KimiLinearStaticCache``, i.e. CUDA-graph replays). Also the residual's own kernels, the Triton kernels of
``kimi_hf.kernels.attn_res`` (the standard's fused PreNorm and addition; Block's depth attention, phase 1 and 2,
source stores and parameter reduction): their difference is the overhead of the residual itself, apart from any
drift of the other kernels. A second table splits those kernels by name (median GPU time per call over the
repetitions): where the overhead goes. The models, shapes and block sizes are ``bench_attn_res.py``'s.

  python kernels/benchmarks/bench_attn_res_paired.py                      # both models, 7 repetitions (GPU)
  python kernels/benchmarks/bench_attn_res_paired.py --model kimi_linear --reps 11 --phases decode
  python kernels/benchmarks/bench_attn_res_paired.py --tiny               # CPU smoke test: wall times, no profiler
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable

import torch
from _profile import json_safe, kernel_times_us
from bench_attn_res import MODELS, build_model, configure_impl, shape_of

from kimi_hf import KimiLinearForCausalLM, KimiLinearStaticCache
from kimi_hf.kernels._launch import add_set_option, apply_set_option
from kimi_hf.models.kimi_linear.modeling_kimi_linear import CACHE_FIELD

PHASES = ("train", "prefill", "decode")
RESIDUALS = ("standard", "block")
DEFAULT_CALLS = {"train": 3, "prefill": 3, "decode": 20}


def residual_kernel_names() -> frozenset[str]:
    """Names of the Triton kernels of ``kimi_hf.kernels.attn_res`` (as the profiler lists them)."""
    import triton

    from kimi_hf.kernels.attn_res import _triton

    return frozenset(
        name for name, fn in vars(_triton).items() if isinstance(fn, triton.JITFunction) and not name.startswith("_")
    )


def wall_time_us(fn: Callable[[], object], calls: int) -> float:
    """CPU smoke test: wall time per call after one untimed call (no GPU, no profiler)."""
    import time

    fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


class Subject:
    """One model with its inputs: a training step, a prefill and a decode step that advances its own cache."""

    def __init__(self, args: argparse.Namespace, model_name: str, residual: str, device: torch.device, dtype):
        batch, seq, _ = shape_of(args, model_name)
        self.model = build_model(args, model_name, residual, device, dtype)
        configure_impl(self.model, "triton" if device.type == "cuda" else "torch", one_pass=False)
        gen = torch.Generator(device="cpu").manual_seed(0)
        vocab = self.model.config.vocab_size
        self.ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
        prompt = torch.randint(0, vocab, (1, args.decode_prompt), generator=gen).to(device)
        steps = 2 + args.reps * (args.calls_per_phase["decode"] + 1) + 4  # every decode call of the run, and slack
        static = {}
        if isinstance(self.model, KimiLinearForCausalLM) and device.type == "cuda":
            static = {CACHE_FIELD: KimiLinearStaticCache(self.model.config, args.decode_prompt + steps)}
        with torch.no_grad():
            out = self.model.eval()(prompt, use_cache=True, **static)
        self.cache = getattr(out, "cache", None) or out.past_key_values
        self.token = out.logits[:, -1:].argmax(-1)

    def train(self) -> None:
        self.model.train()
        self.model(self.ids, labels=self.ids, use_cache=False).loss.backward()
        self.model.zero_grad(set_to_none=True)

    @torch.no_grad()
    def prefill(self) -> None:
        self.model.eval()(self.ids, use_cache=False)

    @torch.no_grad()
    def decode(self) -> None:
        logits = self.model.eval()(self.token, past_key_values=self.cache, use_cache=True).logits
        self.token = logits[:, -1:].argmax(-1)


def measure_model(args: argparse.Namespace, model_name: str, device: torch.device, dtype) -> list[dict]:
    """Rows ``{model, phase, rep, residual, total_us, own_us}``, printed as JSON lines as they are measured."""
    subjects = {residual: Subject(args, model_name, residual, device, dtype) for residual in RESIDUALS}
    names = residual_kernel_names()
    for subject in subjects.values():  # compile, autotune, capture graphs: nothing below is a first call
        for phase in args.phases:
            for _ in range(2):
                getattr(subject, phase)()
    rows = []
    for rep in range(args.reps):
        for phase in args.phases:
            for residual in RESIDUALS if rep % 2 == 0 else RESIDUALS[::-1]:
                fn = getattr(subjects[residual], phase)
                calls = args.calls_per_phase[phase]  # after one untimed call: a warm step of this model, not the other
                kernels = {}
                if device.type == "cuda":
                    times = kernel_times_us(fn, calls)
                    kernels = {name: t for name, t in times.items() if name in names}
                    total, own = sum(times.values()), sum(kernels.values())
                    if own == 0:  # a renamed kernel would drop out of the residual's share: say so, keep the totals
                        print(f"WARNING: no kernel of {sorted(names)} in the {residual} model's {phase} profile; "
                              "its residual share is not measured", flush=True)  # fmt: skip
                        own = float("nan")
                else:
                    total, own = wall_time_us(fn, calls), float("nan")
                row = dict(model=model_name, phase=phase, rep=rep, residual=residual, total_us=total, own_us=own,
                           kernels=kernels)  # fmt: skip
                rows.append(row)
                print(json.dumps(json_safe(row), allow_nan=False), flush=True)
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Per model and phase: median totals, the per-repetition ratio Block / standard (median, min, max) and the
    residual kernels' difference as a share of the standard's median total."""
    out = []
    for key in dict.fromkeys((r["model"], r["phase"]) for r in rows):
        by_rep: dict[int, dict[str, dict]] = {}
        for r in rows:
            if (r["model"], r["phase"]) == key:
                by_rep.setdefault(r["rep"], {})[r["residual"]] = r
        pairs = [p for p in by_rep.values() if len(p) == 2]
        ratios = [p["block"]["total_us"] / p["standard"]["total_us"] for p in pairs]
        standard = statistics.median(p["standard"]["total_us"] for p in pairs)
        own = [(p["block"]["own_us"] - p["standard"]["own_us"]) / p["standard"]["total_us"] for p in pairs]
        own = [x for x in own if x == x]  # NaN: not measured (CPU, or a kernel missing from the profile)
        out.append(dict(
            model=key[0], phase=key[1], reps=len(pairs), standard_us=standard,
            block_us=statistics.median(p["block"]["total_us"] for p in pairs),
            ratio_median=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios),
            own_share_median=statistics.median(own) if own else float("nan"),
        ))  # fmt: skip
    return out


def kernel_split(rows: list[dict]) -> list[dict]:
    """Per model, phase, residual and residual kernel: the median of its GPU time per call over the repetitions
    (0 in a repetition whose profile lacks it). Empty off the GPU."""
    out = []
    for key in dict.fromkeys((r["model"], r["phase"], r["residual"]) for r in rows):
        reps = [r["kernels"] for r in rows if (r["model"], r["phase"], r["residual"]) == key]
        for name in sorted({name for kernels in reps for name in kernels}):
            median = statistics.median(kernels.get(name, 0.0) for kernels in reps)
            out.append(dict(model=key[0], phase=key[1], residual=key[2], kernel=name, us=median))
    return out


def markdown(summary: list[dict], header: str) -> str:
    pct = lambda x: "-" if x != x else f"{(x - 1) * 100:+.2f}%"  # noqa: E731  (NaN: not measured)
    lines = [
        header,
        "",
        "| model | phase | pairs | standard (us) | Block (us) | Block / standard: median [min, max] | "
        "residual kernels' difference / standard |",
        "| --- | --- | ---: | ---: | ---: | --- | ---: |",
    ]
    for s in summary:
        lines.append(
            f"| {s['model']} | {s['phase']} | {s['reps']} | {s['standard_us']:.1f} | {s['block_us']:.1f} | "
            f"{pct(s['ratio_median'])} [{pct(s['ratio_min'])}, {pct(s['ratio_max'])}] | "
            f"{pct(1 + s['own_share_median'])} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=list(MODELS), choices=MODELS, help="models, in this order")
    p.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES, help="what to measure")
    p.add_argument("--reps", type=int, default=7, help="repetitions, i.e. pairs per model and phase (default 7)")
    p.add_argument("--calls", type=int, default=None, help="profiled calls per measurement (default: train and "
                   "prefill 3, decode 20; tiny 2)")  # fmt: skip
    p.add_argument("--tiny", action="store_true", help="tiny configs on CPU (smoke test); times are not meaningful")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: dense 4, kimi_linear 2; tiny 2)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: dense 2048, kimi_linear 4096)")
    p.add_argument("--block-size", type=int, default=None, help="sublayers per block (default: dense 8 of 32, "
                   "kimi_linear 4 of 16; tiny 2)")  # fmt: skip
    p.add_argument("--decode-prompt", type=int, default=None, help="decode prompt length (default 512; 8 tiny)")
    p.add_argument("--attn", default="sdpa", help="attention implementation (sdpa, eager, ...)")
    p.add_argument("--json", default=None, help="also write the rows and the summary to this JSON file")
    add_set_option(p, "attn_res.two_phase.STORE_PHASE1_SPLIT_ROWS=256")
    args = p.parse_args(argv)
    args.launch_constants = apply_set_option(p, args)
    args.decode_prompt = args.decode_prompt or (8 if args.tiny else 512)
    # per phase: a decode step is ~100x shorter than a training step
    args.calls_per_phase = {
        phase: args.calls or (2 if args.tiny else DEFAULT_CALLS[phase]) for phase in PHASES
    }  # fmt: skip
    for name in ("reps", "calls", "batch", "seq", "block_size", "decode_prompt"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.tiny and not torch.cuda.is_available():
        p.error("needs a CUDA GPU (or --tiny for the CPU smoke test)")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    rows = []
    for model_name in args.model:
        print(f"== {model_name}", flush=True)
        rows += measure_model(args, model_name, device, dtype)
    summary = summarise(rows)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (wall time)"
    header = (f"{gpu}, torch {torch.__version__}, {str(dtype).removeprefix('torch.')}; {args.reps} repetitions, "
              f"{'GPU time (profiler)' if device.type == 'cuda' else 'wall time'} per call")  # fmt: skip
    print(markdown(summary, header), flush=True)
    split = kernel_split(rows)
    if split:
        print("\n| model | phase | residual | kernel | GPU time per call (us), median |")
        print("| --- | --- | --- | --- | ---: |")
        for k in split:
            print(f"| {k['model']} | {k['phase']} | {k['residual']} | {k['kernel']} | {k['us']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            record = dict(args=vars(args), rows=rows, summary=summary, kernels=split)
            json.dump(json_safe(record), f, indent=2, allow_nan=False)
    return summary


if __name__ == "__main__":
    main()
