"""``mktme-emu scenario NAME|all``: the SPEC section 6 scenarios with their result table."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from ..scenarios import SCENARIOS, format_table, run_scenarios
from ..scenarios.session import ScenarioError, SessionOptions
from .args import size

EXIT_DIFFERS = 1


def add_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    cmd = commands.add_parser(
        "scenario", help="run a user scenario (or all) in real VMs and print the outcome table",
        description="Boot as many VMs as the scenario needs on the same emulated NVDIMM, run the "
                    "guest phases with mktme-guest, check the media from the host. Exits 1 when "
                    f"an outcome differs from the model. Scenarios: {', '.join(SCENARIOS)}.")
    cmd.add_argument("name", choices=[*SCENARIOS, "all"])
    cmd.add_argument("--json", action="store_true", help="print the rows as JSON")
    cmd.add_argument("--accel", default="auto", choices=("auto", "kvm", "tcg"))
    cmd.add_argument("--nvdimm-size", type=size, default=256 << 20)
    cmd.add_argument("--workdir", type=Path, help="keep the NVDIMM state directories here")
    cmd.set_defaults(func=_scenario)


def _progress(message: str) -> None:
    print(f"mktme-emu: {message}", file=sys.stderr, flush=True)


def _scenario(args: argparse.Namespace) -> int:
    names = list(SCENARIOS) if args.name == "all" else [args.name]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mktme-scenario-"))
    options = SessionOptions(workdir=workdir, accel=args.accel, nvdimm_size=args.nvdimm_size,
                             progress=_progress)
    try:
        rows = run_scenarios(names, options)
    except ScenarioError as exc:
        print(f"--- guest console tail ---\n{exc.console_tail}\n---", file=sys.stderr)
        raise
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
    else:
        print(format_table(rows))
    return 0 if all(r.ok for r in rows) else EXIT_DIFFERS
