"""Register use and spills of the chunked KDA Triton kernels on Hopper, compiled without a GPU.

Each kernel is compiled for sm_90 with the tile sizes and warps that ``kimi_hf.kernels.kda.chunk``
launches (bf16 inputs, K = V = 128 unless given), and ptxas reports its registers per thread and the
bytes it spills to local memory. Spills in these kernels cost far more than the arithmetic, so this is
the first check of a kernel change, and it runs on any machine with triton installed (no CUDA device).

    python kernels/benchmarks/kda_registers.py [--head-dim 128] [--ptxas PATH]

The PTX is assembled with the ptxas that ships with triton (the newest one that accepts the PTX
version). Register allocation depends on the triton version: compare under the one the GPU runs.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # a real compilation, not the interpreter

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kimi_hf.kernels.kda import chunk, chunk_bwd, chunk_fwd  # noqa: E402

_FP32_POINTERS = {
    "G", "P", "gl", "h0", "ht", "dht", "dh0", "dA_qk", "dP", "dg", "dG", "dlast_part", "dbeta", "dA_log_part",
    "ddt_bias_part", "dq", "dk", "dkp", "dkm",
    "A_log", "dt_bias", "g", "g_raw", "beta",
}  # fmt: skip
_INT_POINTERS = {"chunk_indices", "cu_seqlens", "chunk_offsets", "exact"}
# The stages of a launch that names none: Triton's default for CUDA (the report otherwise describes another kernel)
UNNAMED_STAGES = 3
_SCALARS = {"scale": "fp32", "NC": "i32", "H": "i32", "K": "i32", "V": "i32"}


def signature(
    fn,
    constexprs: dict,
    scalars: dict = _SCALARS,
    fp32_pointers: set = _FP32_POINTERS,
    int_pointers: set = _INT_POINTERS,
) -> dict:
    """Triton's type of every argument of ``fn``: constexpr, a scalar (``scalars``: name -> type), or a pointer (bf16
    unless it is an fp32 or int32 buffer). The defaults are the KDA kernels' names. Every constexpr parameter must be
    given: one left out would be compiled as a pointer, and a report of another variant than the launchers run."""
    missing = [fn.arg_names[i] for i in fn.constexprs if fn.arg_names[i] not in constexprs]
    if missing:
        raise ValueError(f"{fn.__name__}: no value for the constexpr parameters {missing}")
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in scalars:
            sig[name] = scalars[name]
        else:
            sig[name] = "*fp32" if name in fp32_pointers else "*i32" if name in int_pointers else "*bf16"
    return sig


def launch_configs(head_dim: int) -> list[tuple[object, dict, int, int]]:
    """(kernel, constexprs, num_warps, num_stages) as the launchers in ``chunk.py`` use them for bf16 and
    K = V = head_dim."""
    BK, BV = chunk._dims(head_dim, head_dim)
    bvs = chunk._state_block_v(BK, BV)
    common = dict(BT=chunk.CHUNK, IEEE="tf32")
    warps = chunk.NUM_WARPS
    inverse, wu, norms = chunk._fuse_levels()  # (with the L2 norm of q, k, as the model calls the op)
    eps = chunk.L2NORM_EPS
    return [
        (chunk_fwd.kda_prep_fwd_kernel, dict(BT=chunk.CHUNK, BK=BK, L2NORM=not norms, GATE=True, EPS=eps), warps,
         UNNAMED_STAGES),
        (chunk_fwd.kda_chunk_dots_fwd_kernel,
         dict(common, BK=min(BK, chunk.CHUNK_DOTS_KEY_BLOCK), SPAN=chunk.CHUNK_DOT_SPAN, INVERSE=inverse, WU=wu,
              BK_WU=min(BK, chunk.WU_KEY_BLOCK), BV=BV, NORMS=norms, EPS=eps, ROW_LIMIT=chunk._row_limit(),
              SAVE=False), chunk.CHUNK_DOTS_WARPS, chunk.CHUNK_DOTS_STAGES),
        (chunk_fwd.kda_flagged_fwd_kernel,
         dict(common, BC=chunk.SUB, BK_DIAG=min(BK, chunk.DIAG_DOTS_KEY_BLOCK), BK_PAIRS=min(BK, chunk.PAIRS_KEY_BLOCK),
              BK_WU=min(BK, chunk.WU_KEY_BLOCK), BV=BV, SPAN=chunk.DIAG_DOT_SPAN, INVERSE=inverse, WU=wu,
              BLOCK=chunk.FLAGGED_BLOCK), chunk.FLAGGED_WARPS, 1),
        # (the inverse kernel launched below CHUNK_DOTS_FUSE 1, the W/U kernel below 2)
        (chunk_fwd.kda_inverse_fwd_kernel, dict(common, BC=chunk.SUB), chunk.INVERSE_WARPS, UNNAMED_STAGES),
        (chunk_fwd.kda_wu_fwd_kernel, dict(common, BK=min(BK, chunk.WU_KEY_BLOCK), BV=BV), chunk.WU_WARPS,
         chunk.WU_STAGES),
        (chunk_fwd.kda_state_fwd_kernel, dict(common, BK=BK, BV=bvs, HAS_H0=True, STORE_HT=True),
         chunk._state_fwd_warps(BK), 1),
        (chunk_fwd.kda_output_fwd_kernel, dict(common, BK=BK, BV=BV), warps, 1 if BK > 128 else 2),
        (chunk_bwd.kda_state_bwd_kernel, dict(common, BK=BK, BV=bvs, HAS_DHT=True, STORE_DH0=True), warps, 1),
        (chunk_bwd.kda_pair_bwd_kernel, dict(common, BK=BK, BV=min(BV, chunk.BWD_PAIR_BLOCK_V)),
         chunk.BWD_PAIR_WARPS, chunk.BWD_PAIR_STAGES),
        (chunk_bwd.kda_direct_bwd_kernel,
         dict(common, BK=min(BK, chunk.BWD_DIRECT_KEY_BLOCK), BV=min(BV, chunk.BWD_DIRECT_BLOCK_V)),
         chunk.BWD_DIRECT_WARPS, chunk.BWD_DIRECT_STAGES),
        (chunk_bwd.kda_key_bwd_kernel,
         dict(common, BC=chunk.SUB, BK=min(BK, chunk.BWD_KEY_BLOCK), SPAN=chunk.DIAG_DOT_SPAN),
         chunk.BWD_KEY_WARPS, chunk.BWD_KEY_STAGES),
        (chunk_bwd.kda_gate_bwd_kernel, dict(BT=chunk.CHUNK, BK=min(BK, chunk.BWD_KEY_BLOCK), GATE=True), 4,
         UNNAMED_STAGES),
    ]  # fmt: skip


def default_ptxas() -> str:
    """The newest ptxas bundled with triton (the plain one can be older than the PTX triton emits)."""
    folder = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for name in ("ptxas-blackwell", "ptxas"):
        if os.path.exists(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise FileNotFoundError(f"no ptxas in {folder}; pass --ptxas")


def _aligned(fn, signature: dict, divisible_ints: tuple[str, ...]) -> dict:
    """What Triton's launcher tells the compiler at the benchmark shapes: every pointer 16-byte aligned, and the
    integers ``divisible_ints`` (KDA: the head count and head dims, H = 32, K = V = 128) multiples of 16. Without it
    the compiler cannot prove vector accesses aligned, and the registers it reports are not those of the kernel
    that runs."""
    divisible = [i for i, name in enumerate(fn.arg_names) if signature[name].startswith("*") or name in divisible_ints]
    return {(i,): [["tt.divisibility", 16]] for i in divisible}


def report(
    fn,
    constexprs: dict,
    num_warps: int,
    num_stages: int,
    ptxas: str,
    types: dict | None = None,
    divisible_ints: tuple[str, ...] = ("H", "K", "V"),
    shown: tuple[str, ...] = ("BK", "BV"),
    maxnreg: int | None = None,
) -> str:
    """One line: registers per thread, spilled bytes and shared memory per program of ``fn`` compiled for sm_90, with
    the constexprs ``shown``.
    ``types`` (Triton's argument types, constexprs included; see :func:`signature`) defaults to the KDA kernels'."""
    types = types or signature(fn, constexprs)
    src = ASTSource(fn=fn, signature=types, constexprs=constexprs, attrs=_aligned(fn, types, divisible_ints))
    options = {"num_warps": num_warps, "num_stages": num_stages} | ({"maxnreg": maxnreg} if maxnreg else {})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        out = subprocess.run([ptxas, "-arch=sm_90a", "-v", ptx, "-o", os.path.join(tmp, "kernel.cubin")],
                             capture_output=True, text=True, check=True).stderr  # fmt: skip
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    stores, loads = (spill.group(1), spill.group(2)) if spill else ("0", "0")
    tiles = ", ".join(f"{k}={v}" for k, v in constexprs.items() if k in shown)
    used = regs.group(1) if regs else "?"
    shared = compiled.metadata.shared
    return f"| {fn.fn.__name__} | {tiles} | {num_warps} | {num_stages} | {used} | {stores} | {loads} | {shared} |"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head-dim", type=int, default=128, help="K = V (default 128)")
    parser.add_argument("--ptxas", default=None, help="ptxas binary (default: the newest bundled with triton)")
    args = parser.parse_args(argv)
    ptxas = args.ptxas or default_ptxas()
    print(f"triton {triton.__version__}, sm_90, bf16, K = V = {args.head_dim}")
    print("| kernel | tiles | warps | stages | registers | spill stores (B) | spill loads (B) | shared memory (B) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for fn, constexprs, warps, stages in launch_configs(args.head_dim):
        print(report(fn, constexprs, warps, stages, ptxas), flush=True)


if __name__ == "__main__":
    main()
