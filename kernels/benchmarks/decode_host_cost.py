"""What one Kimi Linear decode step costs the host on the CUDA path, measured on CPU: launches and Python time.

A growing-cache decode step is host-bound on the GPU (session 22: 23.35 ms per token for about 1.4 ms of GPU time),
so its cost is the number of launches and the Python around them. This script runs the step on the path CUDA takes
(every op forced to its Triton kernels, under Triton's interpreter; the MoE's decode path forced on) with a model of
the ~1B reference config's layer structure at tiny widths, and reports:

- the profiler's leaf aten operators that would launch work (views and allocations left out; on CPU ``sdpa``
  decomposes into about 20 of them, on CUDA it is one or two kernels);
- the Triton launches, counted at the launcher and **not run** (so that the interpreter's own copies stay out of
  the operator count, and the step's time is its Python and tiny CPU operators);
- the wall time per step with the launches stubbed (Python plus tiny CPU operators; not a GPU number).

    python kernels/benchmarks/decode_host_cost.py            # counts and time per step
    python kernels/benchmarks/decode_host_cost.py --python 25  # also the top Python functions (cProfile)

Counting at the launcher patches ``triton.runtime.interpreter.InterpretedFunction.run`` (Triton 3.6-3.9).
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # read when triton is first imported
os.environ["KIMI_HF_KERNEL_BACKEND"] = "triton"

import argparse  # noqa: E402
import collections  # noqa: E402
import cProfile  # noqa: E402
import pstats  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from kimi_hf.cli import positive_int  # noqa: E402

# Operators that launch nothing on CUDA: views, metadata, allocations, and composites whose children are counted.
NO_LAUNCH = {
    "aten::" + name
    for name in (
        "view reshape transpose split split_with_sizes select slice expand as_strided unsqueeze squeeze t detach "
        "empty empty_like new_empty empty_strided _unsafe_view alias chunk narrow permute lift_fresh resolve_conj "
        "resolve_neg _reshape_alias contiguous result_type is_nonzero item _local_scalar_dense detach_ unbind view_as "
        "to _to_copy linear matmul flatten expand_as type_as promote_types zeros ones full new_zeros new_ones new_full "
        "zeros_like ones_like full_like arange scalar_tensor squeeze_ unsqueeze_ set_ is_same_size"
    ).split()
}


def tiny_reference_model():
    """The reference ~1B config's layers (6 KDA, 2 MLA, 7 MoE of 16 experts top-4 + a shared expert, dense layer 0)
    at tiny widths, in eval mode."""
    from kimi_hf import KimiLinearConfig, KimiLinearForCausalLM

    config = KimiLinearConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, num_experts=16,
        num_experts_per_token=4, moe_intermediate_size=32, num_shared_experts=1, first_k_dense_replace=1,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
        linear_attn_config={"kda_layers": [1, 2, 3, 5, 6, 7], "full_attn_layers": [4, 8], "num_heads": 2,
                            "head_dim": 32, "short_conv_kernel_size": 4},
    )  # fmt: skip
    torch.manual_seed(0)
    return KimiLinearForCausalLM(config).eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", type=positive_int, default=8, help="prompt tokens before the step (default 8)")
    parser.add_argument("--steps", type=positive_int, default=50, help="timed decode steps (default 50)")
    parser.add_argument("--python", type=int, default=0, metavar="N", help="also list the top N Python functions")
    args = parser.parse_args(argv)

    from triton.runtime.interpreter import InterpretedFunction

    from kimi_hf import KimiLinearCache
    from kimi_hf.models.kimi_linear.modeling_kimi_linear import CACHE_FIELD, KimiLinearSparseMoE

    launches: collections.Counter = collections.Counter()
    run_kernels = True
    original_run = InterpretedFunction.run

    def counted_run(self, *run_args, **run_kwargs):
        launches[self.fn.__name__] += 1
        return original_run(self, *run_args, **run_kwargs) if run_kernels else None

    InterpretedFunction.run = counted_run
    KimiLinearSparseMoE._use_decode_experts = lambda self, x: not torch.is_grad_enabled() and x.shape[0] <= 64
    torch.set_num_threads(1)
    model = tiny_reference_model()
    cache = KimiLinearCache(model.config)
    token = torch.tensor([[5]])

    def step() -> None:
        mask = torch.ones(1, cache.get_seq_length() + 1, dtype=torch.long)
        model(token, attention_mask=mask, use_cache=True, **{CACHE_FIELD: cache})

    with torch.no_grad():
        model(torch.randint(3, 256, (1, args.prompt)), use_cache=True, **{CACHE_FIELD: cache})
        run_kernels = False  # from here on launches are counted, not run
        step()
        launches.clear()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        step_launches = collections.Counter(launches)  # this step's (the timed steps below count on)
        operators: collections.Counter = collections.Counter()
        for event in prof.events():
            launches_work = event.name.startswith("aten::") and event.name not in NO_LAUNCH
            composite = any(c.name.startswith("aten::") and c.name not in NO_LAUNCH for c in event.cpu_children)
            if launches_work and not composite:
                operators[event.name] += 1
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        per_step = (time.perf_counter() - start) / args.steps * 1e3
        n_ops, n_triton = sum(operators.values()), sum(step_launches.values())
        print(f"one decode step: {n_ops} aten operators + {n_triton} Triton launches = {n_ops + n_triton}; "
              f"{per_step:.3f} ms per step with the launches stubbed (mean of {args.steps} steps)")
        for name, count in operators.most_common():
            print(f"  {count:4d}  {name}")
        for name, count in step_launches.most_common():
            print(f"  {count:4d}  {name} (Triton)")
        if args.python:
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(args.steps):
                step()
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(args.python)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
