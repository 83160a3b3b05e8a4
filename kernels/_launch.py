"""Overriding integer launch constants (tiles, warps, variant switches) of ``kimi_hf.kernels`` modules for one run.

The benchmarks' ``--set MODULE.NAME=INT`` (e.g. ``kda.chunk.FLAGGED_WARPS=2``, ``moe.GATE_UP_SPLIT=1``): the
launchers read these module constants at each call, so a setting applies from the next call on.
"""

from __future__ import annotations

import argparse
import importlib


def _int_constant(name: str) -> tuple | None:
    """(module, attribute) of the integer launch constant ``MODULE.NAME`` (MODULE relative to ``kimi_hf.kernels``), or
    None if there is no such constant."""
    module_name, _, attr = name.rpartition(".")
    try:
        module = importlib.import_module(f"kimi_hf.kernels.{module_name}")
    except ImportError:
        return None
    return (module, attr) if isinstance(getattr(module, attr, None), int) else None


def get_launch_constant(name: str) -> int:
    """Current value of the integer launch constant ``MODULE.NAME``; ``ValueError`` naming it if there is none."""
    found = _int_constant(name)
    if found is None:
        raise ValueError(f"{name!r} is not an integer constant of a kimi_hf.kernels module")
    return getattr(*found)


def set_launch_constants(specs: list[str]) -> dict[str, int]:
    """Apply ``["MODULE.NAME=INT", ...]`` (MODULE relative to ``kimi_hf.kernels``); returns what was set.

    Raises ``ValueError`` naming the spec when NAME is not an integer constant of the module or INT not an integer.
    """
    done = {}
    for spec in specs:
        name, _, value = spec.partition("=")
        found = _int_constant(name)
        if found is None or not value.lstrip("-").isdigit():
            raise ValueError(
                f"--set takes MODULE.NAME=INT with NAME an integer constant of kimi_hf.kernels.MODULE, got {spec!r}"
            )
        setattr(*found, int(value))
        done[name] = int(value)
    return done


def add_set_option(parser: argparse.ArgumentParser, example: str, scope: str = "this run") -> None:
    """The benchmarks' ``--set MODULE.NAME=INT [...]`` option, and ``--set-file PATH [...]`` (the same specs read
    from files, e.g. the best combination a sweep wrote); ``example`` names one constant in the help."""
    parser.add_argument("--set", nargs="+", default=[], metavar="MODULE.NAME=INT",
                        help=f"launch constants of kimi_hf.kernels for {scope} (e.g. {example})")  # fmt: skip
    parser.add_argument("--set-file", nargs="+", default=[], metavar="PATH",
                        help="files of MODULE.NAME=INT specs (whitespace-separated), applied before --set")  # fmt: skip


def apply_set_option(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, int]:
    """Apply ``args.set_file``'s specs, then ``args.set`` (see :func:`set_launch_constants`); a bad spec or a missing
    file exits through ``parser.error``."""
    specs = []
    for path in args.set_file:
        try:
            with open(path) as f:
                specs += f.read().split()
        except OSError as exc:
            parser.error(f"--set-file: {exc}")
    try:
        return set_launch_constants(specs + args.set)
    except ValueError as exc:
        parser.error(str(exc))
