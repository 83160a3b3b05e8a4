"""Register use and spills of the Attention Residuals Triton kernels on Hopper, compiled without a GPU.

Every kernel of ``kimi_hf.kernels.attn_res._triton`` is compiled for sm_90 with the tiles and warps its launcher
picks at hidden size D (default 2048, the ~1B models'; bf16 activations, float32 statistics), in the variants the
models launch: with and without the partial sum, the fused PreNorm and the fused addition; phase 1 with its
sources in one register tile and without; the forward on one tile of 2, 4 and 8 sources; the backward on one tile
of 2 sources (three programs per SM, registers capped: ``fused._narrow_launch``) and of a few, with the partial sum
apart from a tile of 4 (``fused.BWD_PARTIAL_APART``), on one wider tile (``fused.BWD_ONE_TILE_SOURCES``) and on two
passes, and with its stored sources' gradients deferred (``fused.DeferredGrads``, with the deferred pass). It shows
what Triton's interpreter cannot: a kernel that does not compile for the GPU (a session-11 edit of phase 1 compiled
under the interpreter and failed on the H200) and one that spills. The compile step is ``kda_registers.py``'s.

    python kernels/benchmarks/attn_res_registers.py [--hidden-size 2048] [--ptxas PATH]
"""

from __future__ import annotations

import argparse
import itertools
import os

os.environ.pop("TRITON_INTERPRET", None)  # a real compilation, not the interpreter

import triton  # noqa: E402
from kda_registers import default_ptxas, report, signature  # noqa: E402

from kimi_hf.kernels.attn_res import _triton, fused, norm, two_phase  # noqa: E402

_FP32_POINTERS = {"rstd_ptr", "lse_ptr", "hrstd_ptr", "du_ptr", "dwn_ptr", "dw_ptr", "coef_ptr", "u_ptr"}
_INTS = ("n_src", "M", "D", "n_prev", "n_q", "per_program", "rows_per_program", "P")
_SCALARS = {name: "i32" for name in _INTS} | {"eps": "fp32", "norm_eps": "fp32"}
# Sources of the dense ~1B Block model at its last boundary (embedding + 4 blocks), and of a 32-sublayer Full one.
_BLOCK_SOURCES, _FULL_SOURCES = 5, 33


def launch_configs(d: int) -> list[tuple]:
    """(kernel, constexprs, num_warps[, register cap]) as the launchers in ``fused.py``, ``two_phase.py`` and
    ``norm.py`` pick them for hidden size ``d``."""
    width, warps = fused.block_d(d), fused.num_warps(d)
    rows, norm_width, norm_warps = norm._rows_and_warps(d)
    q_pad = triton.next_power_of_2(8)  # a block of 8 sublayers
    configs = [(_triton.store_source_kernel, dict(HAS_Y=True, BLOCK_D=width), warps)]
    for partial in (True, False):
        # the forward as forward_tile picks it for the dense model's rows of 5 sources (above FWD_ONE_TILE_SOURCES:
        # the online softmax), and on one tile of 2, 4 and 8 sources
        one_tiles = [fused.forward_tile(wide - partial, partial, width, one_tile_sources=8) for wide in (2, 4, 8)]
        block_row = fused.forward_tile(_BLOCK_SOURCES - partial, partial, width)
        for src_tile, one_tile, fwd_warps, apart in dict.fromkeys([block_row, *one_tiles]):
            configs.append((_triton.depth_attn_fwd_kernel,
                            dict(HAS_PARTIAL=partial, HAS_NORM=True, BLOCK_D=width, SRC_TILE=src_tile,
                                 ONE_TILE=one_tile, APART=apart),
                            fwd_warps))  # fmt: skip
        # as backward_tile picks them for rows of a few sources, one more (with the partial sum: apart from a full
        # tile of stored sources), of up to BWD_ONE_TILE_SOURCES, and of more (deferring the stored sources'
        # gradients on one tile, as a block of the dense model's sublayers does)
        counts = (2, 3, fused.BWD_SOURCE_TILE, fused.BWD_SOURCE_TILE + 1, fused.BWD_ONE_TILE_SOURCES,
                  fused.BWD_ONE_TILE_SOURCES + 1)  # fmt: skip
        tiles = {fused.backward_tile(n_all - partial, partial, width): n_all - partial for n_all in counts}
        for (src_tile, one_tile, bwd_warps, apart), n_stored in tiles.items():
            _, narrow = fused._narrow_launch(src_tile, one_tile, bwd_warps)  # (rows of 2: capped registers)
            modes = [(False, True), (True, True)] if one_tile else [(False, True)]
            if apart:  # as the final aggregation of 4 blocks runs it (``LAST_AS_PARTIAL``): no read of the gradients
                modes.append((False, False))
            for defer, accumulate in modes:
                configs.append((_triton.depth_attn_bwd_kernel,
                                dict(HAS_PARTIAL=partial, HAS_NORM=True, BLOCK_D=width, SRC_TILE=src_tile,
                                     ONE_TILE=one_tile, DEFER=defer,
                                     COEF_PAD=triton.next_power_of_2(n_stored) if defer else 1, APART=apart,
                                     ROW_PARAMS=narrow["ROW_PARAMS"], ACCUMULATE=accumulate,
                                     EVEN_D=bool(fused.BWD_EVEN_D) and width == d,
                                     STAGES=fused.backward_stages(defer, accumulate)),
                                bwd_warps, narrow.get("maxnreg")))  # fmt: skip
    for n_pad in (2, 4, 8):  # the deferred pass over a block's 8 readers, at the dense model's source counts
        configs.append((_triton.deferred_grad_kernel,
                        dict(K=fused.DEFER_READERS, N_PAD=n_pad, BLOCK_D=width, ACCUMULATE=True),
                        fused._warps(width * n_pad, fused.DEFER_ELEMENTS_PER_THREAD)))  # fmt: skip
    configs.append((_triton.param_grad_kernel,
                    dict(HAS_NORM=True, BLOCK=fused.PARAM_GRAD_COLUMNS, ROWS=fused.PARAM_GRAD_ROWS), 4))
    # N_PAD 2, 4 and 8: the Block model's boundaries (v_0 alone: no out; query 0's output kept only as its PreNorm),
    # at decode (a program per row and query); then in prefill (rows in groups, over stored sources)
    for n_sources in (1, 2, 4, _BLOCK_SOURCES):
        n_pad = two_phase._sources_pad(n_sources)
        configs.append((_triton.store_phase1_kernel,
                        dict(HAS_Y=n_sources > 1, HAS_NORM=True, N_PAD=n_pad, BLOCK_D=width, WRITE_OUT=n_sources > 1,
                             FIRST_OUT=False, STORE=True),
                        warps))  # fmt: skip
    # prefill, over 2, 3 (the new one apart) and 4 sources, 8 queries one at a time and in pairs
    default_pairs = two_phase.PREFILL_QUERY_PAIRS
    for (n_prev, q), pairs in itertools.product([(1, 8), (2, 8), (3, 8)], (0, 1)):
        two_phase.PREFILL_QUERY_PAIRS = pairs
        constants, options = two_phase.prefill_rows_layout(n_prev, d, q)
        if pairs and not constants["QUERY_PAIRS"]:
            continue
        configs.append((_triton.store_phase1_rows_kernel,
                        dict(HAS_Y=True, HAS_NORM=True, FIRST_OUT=False, **constants),
                        options["num_warps"], options.get("maxnreg")))  # fmt: skip
    two_phase.PREFILL_QUERY_PAIRS = default_pairs
    # the first boundary, storing v_0 or finding it in its slot; its queries one at a time and in pairs
    for store, pairs in itertools.product((True, False), (False, True)):
        configs.append((_triton.store_scores_kernel,
                        dict(HAS_Y=False, HAS_NORM=True, BR=two_phase.ONE_SOURCE_ROWS, BLOCK_D=width, STORE=store,
                             QUERY_PAIRS=pairs),
                        warps))  # fmt: skip
    configs.append((_triton.phase1_kernel,
                    dict(Q_PAD=q_pad, N_PAD=two_phase._sources_pad(_BLOCK_SOURCES), BLOCK_D=width, ONE_TILE=True,
                         WRITE_OUT=True),
                    warps))  # fmt: skip
    configs.append((_triton.phase1_kernel,
                    dict(Q_PAD=q_pad, N_PAD=two_phase._sources_pad(_FULL_SOURCES),
                         BLOCK_D=min(width, max(16, 8192 // q_pad)), ONE_TILE=False, WRITE_OUT=True),
                    warps))  # fmt: skip
    # (a later sublayer, a block's second, the final aggregation; each also in the first block, scoring its out)
    for partial, add, store_sum, score_out in ((True, True, True, False), (True, False, True, False),
                                               (True, True, False, False), (True, True, True, True),
                                               (True, False, True, True), (False, False, True, False)):  # fmt: skip
        configs.append((_triton.phase2_kernel,
                        dict(HAS_PARTIAL=partial, HAS_ADD=add, STORE_SUM=store_sum, SCORE_OUT=score_out, HAS_NORM=True,
                             BLOCK_D=width), warps))  # fmt: skip
    for add in (True, False):
        configs.append((_triton.rms_norm_fwd_kernel, dict(BR=rows, BLOCK_D=norm_width, HAS_ADD=add), norm_warps))
    configs.append((_triton.rms_norm_bwd_kernel,
                    dict(BR=rows, BLOCK_D=norm_width, BLOCKS=norm._BWD_BLOCKS_PER_PROGRAM), norm_warps))  # fmt: skip
    return configs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden-size", type=int, default=2048, help="D (default 2048)")
    parser.add_argument("--ptxas", default=None, help="ptxas binary (default: the newest bundled with triton)")
    args = parser.parse_args(argv)
    ptxas = args.ptxas or default_ptxas()
    divisible = ("D",) if args.hidden_size % 16 == 0 else ()
    print(f"triton {triton.__version__}, sm_90, bf16, D = {args.hidden_size}")
    print("| kernel | variant | warps | stages | registers | spill stores (B) | spill loads (B) | shared memory (B) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for fn, constexprs, warps, *cap in launch_configs(args.hidden_size):
        types = signature(fn, constexprs, _SCALARS, _FP32_POINTERS, set())  # statistics and partials fp32, else bf16
        variant = tuple(k for k in constexprs if k != "BLOCK_D")
        print(report(fn, constexprs, warps, 1, ptxas, types, divisible, variant, cap[0] if cap else None), flush=True)


if __name__ == "__main__":
    main()
