"""Nsight Compute targets and summaries: where a kernel's time goes, on the GPU, by its hardware counters.

Two targets run the launches to profile once untimed (compiles, fla's autotuning) and once inside the profiler's
range, so that ncu's ``--profile-from-start off`` sees only the second:

* ``target attn_res``: the AttnRes training kernels (forward and backward, fused PreNorm) of the dense ~1B model's
  sublayers, one launch per row type: 1 to 4 stored sources with the partial sum and 4 without, M rows of D (8192 x
  2048, bf16), the readers of 2 or more stored sources deferring their gradients as the model's blocks of 8 do;
* ``target attn_res_prefill``: the dense ~1B Block model's prefill as its inference path runs it (two-phase): the
  block boundaries (the first, over v_0 alone; over 2, 3 and 4 sources with 8 queries; the final aggregation, 1 query
  over 5), each storing the finished block and applying the next sublayer's PreNorm, and one phase 2 with the add;
* ``target kda``: one KDA forward of ours and one of fla 0.6.0 at B1 T8192 H32 D128 bf16 (``bench_kda.py``'s
  inputs, q/k L2-normalised in the kernel).

Two summaries read what ncu wrote: ``summary REPORT`` prints two lines per launch (time, DRAM throughput, bytes,
registers, occupancy, issue-slot use) and its warps' stall reasons per issued instruction; ``sass CSV`` reads one
launch's source page and prints its stall samples by reason and by opcode, and the instructions that hold the most.

  ncu --set full --clock-control none --import-source yes --profile-from-start off -o attn \\
      python kernels/benchmarks/ncu_profile.py target attn_res
  python kernels/benchmarks/ncu_profile.py summary attn.ncu-rep
  ncu --import attn.ncu-rep --page source --csv --print-source sass --kernel-name depth_attn_bwd_kernel \\
      --launch-skip 1 --launch-count 1 > bwd.csv
  python kernels/benchmarks/ncu_profile.py sass bwd.csv --top 12

Session 31 (BENCHMARKS.md, Attention Residuals and KDA sections) read its figures this way, on an H100.
"""

from __future__ import annotations

import argparse
import collections
import csv
import io
import re
import subprocess

# (stored sources, partial sum) of the dense ~1B Block model's sublayers (blocks of 8: each block's first sublayer
# reads its stored sources alone, the other seven add the block's partial sum)
ATTN_RES_ROWS = [(1, True), (2, True), (3, True), (4, True), (4, False)]
# readers of the same stored sources in one of those blocks (``fused.DeferredGrads``)
ATTN_RES_READERS = 8
# what ``summary`` prints per launch: (label, ncu metric)
SUMMARY_METRICS = [
    ("us", "gpu__time_duration.sum"),
    ("dram%", "dram__throughput.avg.pct_of_peak_sustained_elapsed"),
    ("read_MB", "dram__bytes_read.sum"),
    ("written_MB", "dram__bytes_write.sum"),
    ("registers", "launch__registers_per_thread"),
    ("grid", "launch__grid_size"),
    ("occupancy%", "sm__warps_active.avg.pct_of_peak_sustained_active"),
    ("issue%", "smsp__issue_active.avg.pct_of_peak_sustained_active"),
]
_TO_US = {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3}
_TO_MB = {"byte": 1e-6, "Kbyte": 1e-3, "Mbyte": 1.0, "Gbyte": 1e3}
_STALL = re.compile(r"smsp__average_warps_issue_stalled_(\w+)_per_issue_active\.ratio")


def target_attn_res(rows: int, hidden: int) -> None:
    """The forward and backward launches of ``ATTN_RES_ROWS``, once to compile and once inside the profiler range."""
    import torch

    from kimi_hf.kernels.attn_res import fused

    def launches() -> None:
        like = torch.empty(rows, hidden, dtype=torch.bfloat16, device="cuda")
        storage = fused.SourceStorage(max(n for n, _ in ATTN_RES_ROWS) + 1, like, 1e-6)
        for slot in range(storage.store.shape[0]):
            fused.store_source_fwd(storage, slot, torch.randn_like(like), None)
        for n, partial in ATTN_RES_ROWS:
            storage.readers[n] = set(range(ATTN_RES_READERS))  # as many readers as a block has
            part = torch.randn_like(like) if partial else None
            query = torch.randn(hidden, device="cuda") * 0.05
            gain = torch.ones(hidden, device="cuda")
            norm = torch.ones(hidden, dtype=torch.bfloat16, device="cuda")
            _, lse, h_rstd = fused.depth_attn_fwd(storage, n, part, query, gain, norm, 1e-6)
            dout = torch.randn_like(like)
            fused.depth_attn_bwd(storage, n, part, query, gain, norm, dout, lse, h_rstd, defer=True)
        for n in list(storage.deferred):
            storage.deferred.pop(n).flush(storage)
        torch.cuda.synchronize()

    _profiled(launches)


def target_attn_res_prefill(rows: int, hidden: int) -> None:
    """The dense prefill's block boundaries, one phase 2 and the final aggregation (``two_phase``), as the model
    runs them, once to compile and once profiled."""
    import torch

    from kimi_hf.kernels.attn_res import append_source_phase1, depth_attention_phase2_add, new_source_bank

    torch.manual_seed(0)
    like = torch.randn(rows, hidden, dtype=torch.bfloat16, device="cuda")
    norm = torch.ones(hidden, dtype=torch.bfloat16, device="cuda")

    def params(n_q: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(n_q, hidden, device="cuda") * 0.05, 1 + 0.05 * torch.randn(n_q, hidden, device="cuda")

    # every input made here, so that the profiled range holds the AttnRes kernels alone; the boundaries over 1
    # (scoring no query), 2, 3 and 4 sources (the last one's 9th query: the final aggregation's)
    block_params = [params(8), params(8), params(8), params(9)]
    summands = [(torch.randn_like(like), torch.randn_like(like)) for _ in range(3)]

    def launches() -> None:
        with torch.no_grad():
            bank = new_source_bank(4, like, backend="triton")
            bank, out, lse, _ = append_source_phase1(bank, like, None, *block_params[0], norm, first_out=False,
                                                     scores=False)  # fmt: skip
            for (x, y), (queries, gains) in zip(summands, block_params[1:]):
                bank, out, lse, _ = append_source_phase1(bank, x, y, queries, gains, norm, first_out=False)
            # the second sublayer of the last block (out holds queries 1 .. 8), then the final aggregation
            queries, gains = block_params[3]
            depth_attention_phase2_add(out[0], lse[1], like, like, queries[1], gains[1], 1e-6, norm_weight=norm)
            depth_attention_phase2_add(out[7], lse[8], like, like, queries[8], gains[8], 1e-6, norm_weight=norm,
                                       keep_sum=False)  # fmt: skip
        torch.cuda.synchronize()

    _profiled(launches)


def target_kda(seq_len: int) -> None:
    """One KDA forward of ours and one of fla's, once untimed and once inside the profiler range."""
    import torch
    from fla.ops.kda import chunk_kda as fla_chunk_kda

    from kimi_hf.kernels.kda import chunk_kda

    torch.manual_seed(0)
    shape = (1, seq_len, 32, 128)
    inputs = {name: torch.randn(shape, device="cuda", dtype=torch.bfloat16) for name in ("q", "k", "v")}
    inputs["g"] = -torch.rand(shape, device="cuda") * 2
    inputs["beta"] = torch.rand(shape[:3], device="cuda", dtype=torch.bfloat16)

    def launches() -> None:
        with torch.no_grad():
            chunk_kda(**inputs, use_qk_l2norm_in_kernel=True)
            fla_chunk_kda(**inputs, use_qk_l2norm_in_kernel=True)
        torch.cuda.synchronize()

    _profiled(launches)


def _profiled(launches) -> None:
    """Run ``launches`` untimed, then inside cudaProfilerStart/Stop (ncu ``--profile-from-start off``)."""
    import torch

    launches()
    torch.cuda.cudart().cudaProfilerStart()
    launches()
    torch.cuda.cudart().cudaProfilerStop()


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def summary(raw_csv: str) -> list[str]:
    """Two lines per launch of an ncu report's raw page (``ncu --import R --page raw --csv``): ``SUMMARY_METRICS``,
    then its warps' cycles per issued instruction and the reasons that take the most of them."""
    header, units, *launches = list(csv.reader(io.StringIO(raw_csv)))
    col = {name: i for i, name in enumerate(header)}
    stalls = [(m.group(1), col[name]) for name in header if (m := _STALL.fullmatch(name))]
    lines = []
    for row in launches:
        cells = []
        for label, metric in SUMMARY_METRICS:
            if metric not in col or (value := _number(row[col[metric]])) is None:
                continue
            unit = units[col[metric]]
            value *= _TO_US.get(unit, 1.0) if label == "us" else _TO_MB.get(unit, 1.0) if label.endswith("MB") else 1.0
            cells.append(f"{label} {value:.4g}")
        lines.append(f"{row[col['ID']]} {row[col['Kernel Name']][:48]}: " + ", ".join(cells))
        ratios = sorted(((_number(row[i]) or 0.0, name) for name, i in stalls), reverse=True)
        top = ", ".join(f"{name} {value:.2f}" for value, name in ratios[:8])
        lines.append(f"    cycles per issued instruction {sum(value for value, _ in ratios):.2f}: {top}")
    return lines


def sass(source_csv: str, top: int) -> list[str]:
    """Stall samples of one launch's source page (``--page source --csv --print-source sass``): by reason, by
    opcode (with its share of the executed instructions), and the ``top`` instructions holding the most."""
    rows = list(csv.reader(io.StringIO(source_csv)))
    start = next(i for i, row in enumerate(rows) if row and row[0] == "Address")  # (after the kernel's name)
    header, body = rows[start], [row for row in rows[start + 1 :] if len(row) == len(rows[start])]
    col = {name: i for i, name in enumerate(header)}
    samples, executed = col["Warp Stall Sampling (All Samples)"], col["Instructions Executed"]
    reasons = [name for name in header if name.startswith("stall_") and "(Not Issued)" not in name]

    def total(i: int) -> float:
        return sum(_number(row[i]) or 0.0 for row in body) or 1.0

    all_samples, all_executed = total(samples), total(executed)
    by_reason = sorted(((total(col[name]), name[6:]) for name in reasons), reverse=True)
    lines = [
        f"{len(body)} instructions, {all_samples:.0f} samples",
        "  by reason: " + ", ".join(f"{name} {value / all_samples:.1%}" for value, name in by_reason[:9]),
    ]
    by_opcode, opcode_executed = collections.Counter(), collections.Counter()
    for row in body:
        instruction = re.sub(r"^@!?U?P\w+\s+", "", row[col["Source"]].strip())  # (without its predicate)
        opcode = instruction.split()[0].split(".")[0] if instruction else "?"
        by_opcode[opcode] += _number(row[samples]) or 0.0
        opcode_executed[opcode] += _number(row[executed]) or 0.0
    lines.append("  by opcode (samples, executed): " + ", ".join(
        f"{op} {value / all_samples:.1%} {opcode_executed[op] / all_executed:.1%}"
        for op, value in by_opcode.most_common(12)
    ))  # fmt: skip
    for row in sorted(body, key=lambda r: -(_number(r[samples]) or 0.0))[:top]:
        reason = max(reasons, key=lambda name: _number(row[col[name]]) or 0.0)
        share = (_number(row[samples]) or 0.0) / all_samples
        lines.append(f"  {row[col['Address']][-5:]} {share:6.1%} {reason[6:]:14s} {row[col['Source']].strip()[:80]}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    target = sub.add_parser("target", help="run launches for ncu to profile (GPU)")
    target.add_argument("what", choices=("attn_res", "attn_res_prefill", "kda"))
    target.add_argument("--rows", type=int, default=8192, help="attn_res, attn_res_prefill: rows M (B x T)")
    target.add_argument("--hidden-size", type=int, default=2048, help="attn_res, attn_res_prefill: hidden size D")
    target.add_argument("--seq-len", type=int, default=8192, help="kda: sequence length T at B1 H32 D128")
    report = sub.add_parser("summary", help="one line per launch of an ncu report")
    report.add_argument("report")
    source = sub.add_parser("sass", help="stall samples of one launch's source page (csv)")
    source.add_argument("csv")
    source.add_argument("--top", type=int, default=10, help="instructions to list")
    args = parser.parse_args()
    if args.command == "target" and args.what == "attn_res":
        target_attn_res(args.rows, args.hidden_size)
    elif args.command == "target" and args.what == "attn_res_prefill":
        target_attn_res_prefill(args.rows, args.hidden_size)
    elif args.command == "target":
        target_kda(args.seq_len)
    elif args.command == "summary":
        raw = subprocess.run(["ncu", "--import", args.report, "--page", "raw", "--csv"], capture_output=True, text=True)
        print("\n".join(summary(raw.stdout)) if raw.returncode == 0 else raw.stderr)
    else:
        with open(args.csv, newline="") as f:
            print("\n".join(sass(f.read(), args.top)))


if __name__ == "__main__":
    main()
