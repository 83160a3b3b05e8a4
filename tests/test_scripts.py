"""Every user-facing script answers ``--help`` (which also checks that it imports on this machine)."""

from __future__ import annotations

import importlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = [
    "kernels/benchmarks/bench_attn_res.py",
    "kernels/benchmarks/bench_attn_res_paired.py",
    "kernels/benchmarks/bench_ce_lora.py",
    "kernels/benchmarks/bench_kda.py",
    "kernels/benchmarks/bench_model.py",
    "kernels/benchmarks/bench_small_ops.py",
    "kernels/benchmarks/decode_host_cost.py",
    "kernels/benchmarks/kda_registers.py",
    "kernels/benchmarks/ncu_profile.py",
    "recipes/attn_res_replication.py",
    "recipes/ce_lora_quality.py",
    "recipes/ce_lora_seeds.py",
]


@pytest.mark.parametrize(
    "command",
    [[s] for s in SCRIPTS] + [["-m", "kimi_hf.cli"], ["-m", "kimi_hf"]],
    ids=[*SCRIPTS, "kimi-hf", "-m kimi_hf"],
)
def test_script_answers_help(command):
    done = subprocess.run(
        [sys.executable, *command, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=180, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage: "), done.stdout[:500]


def _benchmark_module(name: str):
    """The module ``name`` of kernels/benchmarks, imported with that folder on sys.path (where its scripts run, and
    whose sibling modules they import)."""
    sys.path.insert(0, str(ROOT / "kernels" / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def test_ncu_summary_reads_a_raw_page():
    """Two lines per launch: its metrics in their units (ns to us, bytes to MB) and its stall reasons, most first."""
    reasons = ("long_scoreboard", "selected", "wait")
    stalls = ",".join(f'"smsp__average_warps_issue_stalled_{r}_per_issue_active.ratio"' for r in reasons)
    raw = (
        '"ID","Kernel Name","gpu__time_duration.sum","dram__bytes_read.sum","launch__registers_per_thread",'
        f"{stalls}\n"
        '"","","nsecond","Gbyte","register/thread","","",""\n'
        '"0","depth_attn_bwd_kernel","122,020","0.17","255","1.18","1","0.57"\n'
    )
    lines = _benchmark_module("ncu_profile").summary(raw)
    assert lines[0] == "0 depth_attn_bwd_kernel: us 122, read_MB 170, registers 255"
    assert lines[1] == "    cycles per issued instruction 2.75: long_scoreboard 1.18, selected 1.00, wait 0.57"


def test_ncu_sass_summary_counts_stall_samples():
    """By reason and by opcode (predicates dropped), then the instructions holding the most samples."""
    head = '"Address","Source","Warp Stall Sampling (All Samples)","Instructions Executed","stall_long_sb","stall_wait"'
    source = "\n".join([
        '"Kernel Name","depth_attn_bwd_kernel",""', head,
        '"0x7f0000000010","      LDG.E.128 R4, desc[UR4][R2.64]","0","10","0","0"',
        '"0x7f0000000020","      PRMT R8, R4, 0x7632, R8","30","10","27","3"',
        '"0x7f0000000030","@P5   R2UR UR7, R45","10","10","9","1"',
    ])  # fmt: skip
    lines = _benchmark_module("ncu_profile").sass(source, top=2)
    assert lines[:2] == ["3 instructions, 40 samples", "  by reason: long_sb 90.0%, wait 10.0%"]
    assert lines[2] == "  by opcode (samples, executed): PRMT 75.0% 33.3%, R2UR 25.0% 33.3%, LDG 0.0% 33.3%"
    assert lines[3].split() == ["00020", "75.0%", "long_sb", "PRMT", "R8,", "R4,", "0x7632,", "R8"]
    assert len(lines) == 5


SHELL_SCRIPTS = [
    "scripts/setup_env.sh", "scripts/fetch_gpu_wheels.sh", "scripts/test.sh", "kernels/benchmarks/gpu_session.sh",
    "scripts/demo.sh", "kernels/benchmarks/kda_ab.sh",
]  # fmt: skip


@pytest.mark.parametrize("script", SHELL_SCRIPTS)
def test_shell_script_answers_help_before_doing_anything(script, tmp_path):
    """``--help`` prints the script's header comment and exits 0 before any install, download or test run: with
    only ``dirname`` and ``awk`` on the PATH, a script that went on would fail at its first ``python3``."""
    for tool in ("dirname", "awk"):
        (tmp_path / tool).symlink_to(shutil.which(tool))
    done = subprocess.run([shutil.which("bash"), str(ROOT / script), "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=30, check=False, env={"PATH": str(tmp_path)})  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    header = (ROOT / script).read_text().splitlines()[1].removeprefix("# ")
    assert done.stdout.splitlines()[0] == header and not done.stderr


def test_set_launch_constants_sets_ints_and_names_bad_specs(monkeypatch):
    import re

    from kimi_hf.kernels import _launch, moe

    monkeypatch.setattr(moe, "GATE_UP_SPLIT", moe.GATE_UP_SPLIT)  # restored after the test
    assert _launch.set_launch_constants(["moe.GATE_UP_SPLIT=2"]) == {"moe.GATE_UP_SPLIT": 2}
    assert moe.GATE_UP_SPLIT == 2
    for bad in ["moe.NOPE=1", "nomodule.X=1", "moe.GATE_UP_SPLIT=two", "moe.TRITON_DTYPES=1"]:
        with pytest.raises(ValueError, match=re.escape(repr(bad))):
            _launch.set_launch_constants([bad])


def test_set_file_is_applied_before_set_and_a_missing_file_is_an_error(monkeypatch, tmp_path, capsys):
    """``--set-file`` (a sweep's fastest combination, e.g. from ``bench_kda.py --best-to``): its specs apply first,
    ``--set`` after them; a missing file stops the run with its name."""
    import argparse

    from kimi_hf.kernels import _launch, moe
    from kimi_hf.kernels.kda import chunk

    monkeypatch.setattr(moe, "GATE_UP_SPLIT", moe.GATE_UP_SPLIT)
    monkeypatch.setattr(chunk, "FLAGGED_WARPS", chunk.FLAGGED_WARPS)
    best = tmp_path / "best.txt"
    best.write_text("kda.chunk.FLAGGED_WARPS=2 moe.GATE_UP_SPLIT=2\n")
    parser = argparse.ArgumentParser()
    _launch.add_set_option(parser, "moe.GATE_UP_SPLIT=4")
    args = parser.parse_args(["--set-file", str(best), "--set", "moe.GATE_UP_SPLIT=3"])
    assert _launch.apply_set_option(parser, args) == {"kda.chunk.FLAGGED_WARPS": 2, "moe.GATE_UP_SPLIT": 3}
    assert (chunk.FLAGGED_WARPS, moe.GATE_UP_SPLIT) == (2, 3)
    with pytest.raises(SystemExit):
        _launch.apply_set_option(parser, parser.parse_args(["--set-file", str(tmp_path / "missing.txt")]))
    assert "missing.txt" in capsys.readouterr().err


def test_small_ops_depth_attention_section_runs_tiny():
    """The depth-attention rows of ``bench_small_ops.py`` build their bank and run fwd / fwd+bwd, the block
    boundary and the one-token reads (interpreter)."""
    run_benchmarks = _benchmark_module("bench_small_ops").run_benchmarks
    rows = run_benchmarks(tiny=True, sections=("attn_res", "attn_res_prefill", "attn_res_decode"))
    assert [r.op.rsplit(", ", 1)[1] for r in rows[:6]] == ["fwd", "fwd+bwd"] * 3
    # the boundaries as the models call them (query 0 kept as its PreNorm; over v_0 alone no query scored), over
    # v_0 also with the queries scored, over stored sources also with query 0's output written; then phase 2, with
    # its lone source scored, and the final aggregation
    boundaries = [r.op.removeprefix("block boundary: store + phase 1, ") for r in rows[6:23]]
    expected = []
    for what in ("4 queries x 1 source", "4 queries x 2 sources", "5 queries x 4 sources", "8 queries x 1 source",
                 "8 queries x 2 sources", "8 queries x 3 sources", "9 queries x 4 sources"):  # fmt: skip
        expected.append(f"{what} + PreNorm")
        other = "queries scored" if "1 source" in what else "query 0's output written"
        expected.append(f"{what} + PreNorm, {other}")
    expected += ["phase 2: partial + last output, merge, PreNorm",
                 "phase 2: partial + last output, merge, PreNorm, scoring its lone source",
                 "final aggregation: phase 2 of the last block, sum not kept, + norm"]  # fmt: skip
    assert boundaries == expected
    assert [r.shape.split()[0] for r in rows[23:]] == ["M1"] * 5  # the one-token reads
    assert all(r.ours_us > 0 and r.anchor_us > 0 for r in rows)


def test_small_ops_traffic_section_runs_tiny():
    """``--sections traffic``: the streaming kernel at every read/write mix, floors counting its passes, and the
    torch anchors where one moves the same bytes (interpreter)."""
    rows = _benchmark_module("bench_small_ops").run_benchmarks(tiny=True, sections=("traffic",), bandwidth_tbs=1.0)
    mixes = [tuple(int(w) for w in r.op.split()[1:5:3]) for r in rows]
    assert mixes[:3] == [(1, 0), (0, 1), (1, 1)] and (3, 9) in mixes
    pass_us = 16 * 64 * 4 / 1e12 * 1e6  # one [16, 64] float32 pass at 1 TB/s
    assert all(r.floor_us == pytest.approx(sum(m) * pass_us) and r.ours_us > 0 for r, m in zip(rows, mixes))
    assert [r.anchor for r in rows[:3]] == ["n/a", "torch zero_", "torch copy_"] and rows[1].anchor_us > 0


def test_small_ops_ce_lora_pack_section_runs_tiny():
    """``--sections ce_lora_pack``: the packing pass at each shape, its floor reading ``dY`` and writing ``G`` once,
    cuBLAS's ``dY @ B0`` as the anchor (interpreter)."""
    rows = _benchmark_module("bench_small_ops").run_benchmarks(tiny=True, sections=("ce_lora_pack",), bandwidth_tbs=1.0)
    assert [r.shape for r in rows] == ["T64 O256 r_pad+k=192", "T48 O200 r_pad+k=192"]
    for r, (n_rows, n_cols) in zip(rows, [(64, 256), (48, 200)]):
        assert r.floor_us == pytest.approx(n_rows * (n_cols + 192) * 4 / 1e12 * 1e6)
        assert r.ours_us > 0 and r.anchor == "torch dY @ B0" and r.anchor_us > 0


def test_paired_attn_res_benchmark_runs_tiny():
    """``bench_attn_res_paired.py --tiny``: both residuals measured alternately in every phase, one ratio per pair."""
    main = _benchmark_module("bench_attn_res_paired").main
    summary = main(["--tiny", "--model", "dense", "--reps", "2"])
    assert [(s["model"], s["phase"], s["reps"]) for s in summary] == [
        ("dense", phase, 2) for phase in ("train", "prefill", "decode")
    ]
    assert all(s["ratio_min"] <= s["ratio_median"] <= s["ratio_max"] and s["standard_us"] > 0 for s in summary)


def test_paired_attn_res_kernel_split_takes_medians_over_repetitions():
    """The per-kernel table: a kernel's median over the repetitions of one model, phase and residual, a repetition
    whose profile lacks it counting 0."""
    kernel_split = _benchmark_module("bench_attn_res_paired").kernel_split
    row = dict(model="dense", phase="train", residual="block")
    rows = [
        dict(row, kernels={"fwd": 3.0, "bwd": 9.0}),
        dict(row, kernels={"fwd": 1.0}),
        dict(row, kernels={"fwd": 2.0, "bwd": 5.0}),
        dict(row, residual="standard", kernels={"norm": 4.0}),
    ]
    assert [(k["residual"], k["kernel"], k["us"]) for k in kernel_split(rows)] == [
        ("block", "bwd", 5.0), ("block", "fwd", 2.0), ("standard", "norm", 4.0)
    ]


def test_bandwidth_option_rejects_non_positive_values_and_the_floor_falls_back_off_the_gpu(capsys):
    """``--bandwidth-tbs`` (the benchmarks' byte floors): a value that is not positive is refused by name; without it
    the floors use the GPU's measured copy bandwidth, or on CPU (smoke runs) the H200's from REFERENCE.md."""
    import argparse

    _profile = _benchmark_module("_profile")
    parser = argparse.ArgumentParser()
    _profile.add_bandwidth_option(parser)
    assert parser.parse_args(["--bandwidth-tbs", "3.0"]).bandwidth_tbs == 3.0
    for bad in ["0", "-1", "nan"]:
        with pytest.raises(SystemExit):
            parser.parse_args(["--bandwidth-tbs", bad])
        assert f"argument --bandwidth-tbs: must be a finite number > 0, got {bad}" in capsys.readouterr().err
    assert _profile.floor_bandwidth_tbs(2.5) == 2.5
    if not torch.cuda.is_available():
        assert _profile.floor_bandwidth_tbs() == _profile.H200_COPY_TBS


@pytest.mark.parametrize(
    "option, value",
    [("--steps", "0"), ("--steps", "-1"), ("--seq-len", "0"), ("--eval-blocks", "0"), ("--new-tokens", "0"),
     ("--batch-size", "0"), ("--learning-rate", "-1"), ("--learning-rate", "nan")],
)  # fmt: skip
def test_demo_refuses_non_positive_sizes_before_any_work(option, value, capsys):
    """``kimi-hf demo``'s sizes and rate must be positive: argparse names the option before anything is built (a
    negative --steps used to start an epoch-long run, --seq-len 0 divided by zero after loading the data)."""
    from kimi_hf.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", option, value])
    assert f"argument {option}: must be" in capsys.readouterr().err


def _fake_checkout(tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    """A copy of scripts/ beside a .venv whose python, python3 and kimi-hf only log their folder and arguments: the
    shell scripts run as they are, without installing or running anything. Returns (root, log, environment)."""
    root = tmp_path / "checkout"
    shutil.copytree(ROOT / "scripts", root / "scripts")
    (root / "pyproject.toml").write_text("")
    bin_dir = root / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    log = tmp_path / "calls.log"
    for tool in ("python", "python3", "kimi-hf"):
        (bin_dir / tool).write_text(f'#!/usr/bin/env bash\necho "{tool} $PWD $*" >> "$CALLS_LOG"\n')
        (bin_dir / tool).chmod(0o755)
    (bin_dir / "activate").write_text(f'export PATH="{bin_dir}:$PATH"\n')
    return root, log, {"PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS_LOG": str(log)}


def _kda_ab_checkout(tmp_path: Path, python3: str) -> tuple[dict[str, str], Path, Path, dict[str, str], str]:
    """A fake checkout with kda_ab.sh, its own kernels/kda (two modules) and another tree's (one), ``python3`` standing
    in for bench_kda.py. Returns (environment, own folder, other folder, own modules, script)."""
    root, _, env = _fake_checkout(tmp_path)
    (root / "kernels" / "benchmarks").mkdir(parents=True)
    shutil.copy(ROOT / "kernels" / "benchmarks" / "kda_ab.sh", root / "kernels" / "benchmarks")
    own, other = root / "kernels" / "kda", tmp_path / "other"
    own_modules = {"chunk.py": "own", "only_own.py": ""}
    for folder, modules in ((own, own_modules), (other, {"chunk.py": "other"})):
        folder.mkdir(parents=True)
        for name, text in modules.items():
            (folder / name).write_text(text)
    (root / ".venv" / "bin" / "python3").write_text(python3)
    return env, own, other, own_modules, str(root / "kernels" / "benchmarks" / "kda_ab.sh")


def test_kda_ab_alternates_the_trees_and_restores_the_checkout(tmp_path):
    """``kda_ab.sh OTHER`` times this checkout's kernels/kda and OTHER's in turn (each round: checkout, then other),
    each tree's modules exactly (a module only one tree has is absent from the other's runs), and puts the checkout's
    files back at the end; also when a timeout stops it during the other tree's run."""
    # stands in for bench_kda.py: a sweep row naming the tree in place, then (if asked) a long run
    env, own, other, own_modules, script = _kda_ab_checkout(
        tmp_path,
        '#!/usr/bin/env bash\necho "| 1 | $(cat kernels/kda/chunk.py) $(ls kernels/kda | tr \'\\n\' \' \')|"\n'
        '[ -n "${SLOW_TREE:-}" ] && grep -q "$SLOW_TREE" kernels/kda/chunk.py && sleep 30\nexit 0\n',
    )
    done = subprocess.run(["bash", script, "other", "1x64", "2"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip (OTHER relative to the caller's folder)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| 1 |")]
    assert rows == ["| 1 | own chunk.py only_own.py |", "| 1 | other chunk.py |"] * 2, done.stdout
    assert {p.name: p.read_text() for p in own.iterdir()} == own_modules
    stopped = subprocess.run(["timeout", "5", "bash", script, str(other)], env={**env, "SLOW_TREE": "other"},
                             capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert stopped.returncode == 124 and stopped.stdout.splitlines()[-1].startswith("== other"), stopped.stdout
    assert {p.name: p.read_text() for p in own.iterdir()} == own_modules


def test_kda_ab_restore_outlives_a_second_signal(tmp_path):
    """`timeout` signals the script, then its whole process group; on a loaded machine the second signal can land
    while the restore copies the checkout's files back (CI, session 45). Here a slow ``cp`` holds the restore open
    while the group is signalled again: the restore, which ignores INT and TERM, and the cp it started finish."""
    flag = tmp_path / "flag"
    env, own, other, own_modules, script = _kda_ab_checkout(
        tmp_path, f'#!/usr/bin/env bash\ngrep -q other kernels/kda/chunk.py && touch "{flag}.running" && sleep 30\n'
    )
    cp = Path(env["PATH"].split(":")[0]) / "cp"  # the fake checkout's bin, first on PATH
    cp.write_text(f'#!/usr/bin/env bash\n[ -e "{flag}.running" ] && touch "{flag}.restoring" && sleep 2\n'
                  f'exec {shutil.which("cp")} "$@"\n')  # fmt: skip
    cp.chmod(0o755)

    def wait_for(path: Path) -> None:
        for _ in range(300):
            if path.exists():
                return
            time.sleep(0.1)
        raise AssertionError(f"{path.name} never appeared")

    run = subprocess.Popen(["bash", script, str(other)], env=env, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_for(Path(f"{flag}.running"))
        os.killpg(run.pid, signal.SIGTERM)
        wait_for(Path(f"{flag}.restoring"))
        os.killpg(run.pid, signal.SIGTERM)
        run.wait(timeout=30)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert {p.name: p.read_text() for p in own.iterdir()} == own_modules


def test_demo_script_runs_the_demo_in_the_callers_folder(tmp_path):
    """``bash scripts/demo.sh --output-dir run1`` from another folder writes run1 there, where the user looks for it
    (the script used to cd to the repository first, so relative paths landed inside the checkout)."""
    root, log, env = _fake_checkout(tmp_path)
    elsewhere = tmp_path / "experiments"
    elsewhere.mkdir()
    done = subprocess.run(["bash", str(root / "scripts" / "demo.sh"), "--output-dir", "run1", "--steps", "3"],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert log.read_text().splitlines()[-1] == f"kimi-hf {elsewhere} demo --output-dir run1 --steps 3"


def test_test_script_runs_only_the_test_files_it_is_given(tmp_path):
    """``bash scripts/test.sh tests/test_cli.py`` runs that file: pytest gets no extra ``tests`` path (which made it
    run the whole suite whatever file was named); with options only, pyproject's testpaths picks tests/."""
    assert 'testpaths = ["tests"]' in (ROOT / "pyproject.toml").read_text()  # what the script relies on
    root, log, env = _fake_checkout(tmp_path)
    for args in (["tests/test_cli.py", "-x"], ["-k", "ce_lora"]):
        done = subprocess.run(["bash", str(root / "scripts" / "test.sh"), *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert log.read_text().splitlines()[-1] == f"python {root} -m pytest -q -ra -n auto {' '.join(args)}"


def test_setup_reuses_a_venv_set_up_for_this_pyproject_without_installing(tmp_path):
    """A second ``setup_env.sh`` (every demo.sh and test.sh run makes one) installs nothing: pip's upgrade and the
    editable build need the package index even when all is installed, so a set-up machine could not run the demo
    offline. A changed pyproject.toml or new extras install again."""
    root, log, env = _fake_checkout(tmp_path)

    def pip_calls(*args: str) -> int:
        before = len(log.read_text().splitlines()) if log.exists() else 0
        done = subprocess.run(["bash", str(root / "scripts" / "setup_env.sh"), *args], env=env, capture_output=True,
                              text=True, timeout=60, check=False)  # fmt: skip
        assert done.returncode == 0, done.stderr
        return sum(" -m pip install" in line for line in log.read_text().splitlines()[before:])

    assert pip_calls() == 3  # pip's upgrade, torch, kimi_hf
    assert pip_calls() == 0
    assert pip_calls("test") == 3
    assert pip_calls("test") == 0 and pip_calls() == 0  # the test extras include the runtime's
    (root / "pyproject.toml").write_text("# changed\n")
    assert pip_calls() == 3


def test_a_decode_step_launches_at_most_170_kernels():
    """The growing-cache decode step is host-bound on the GPU: its launch count (session 23: 309 -> 170, counted on
    the CUDA path under Triton's interpreter) must not creep back up unnoticed."""
    import re

    done = subprocess.run(
        [sys.executable, "kernels/benchmarks/decode_host_cost.py", "--steps", "1"], cwd=ROOT, capture_output=True,
        text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    found = re.search(r"(\d+) aten operators \+ (\d+) Triton launches = (\d+);", done.stdout)
    assert found, done.stdout[-2000:]
    assert int(found[3]) <= 170, done.stdout
