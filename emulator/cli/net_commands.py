"""``mktme-emu net clean``: remove what runs with ``--net tap`` left behind when killed.

A tap run removes its namespace when it ends, Ctrl-C included; only a run
killed outright (SIGKILL, a crash of the host process) leaves one, and the
next tap run removes those too.  This command does it on demand.
"""

from __future__ import annotations

import argparse
import json

from mktme_emu.vm.net import NETNS_DIR, clean_stale, owner_alive


def cmd_net_clean(args: argparse.Namespace) -> int:
    """Remove the namespaces of tap runs that are gone; leave running runs' alone."""
    removed = clean_stale()
    names = sorted(p.name for p in NETNS_DIR.iterdir()) if NETNS_DIR.is_dir() else []
    running = [n for n in names if owner_alive(n)]
    if args.json:
        print(json.dumps({"removed": removed, "running": running}))
        return 0
    for name in removed:
        print(f"removed {name}")
    for name in running:
        print(f"kept {name} (its run is still going)")
    if not removed and not running:
        print("nothing to clean")
    return 0


def add_net_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``net clean`` on the top-level subparsers."""
    net = subparsers.add_parser("net", help="guest networking (--net tap) housekeeping")
    sub = net.add_subparsers(dest="net_command", metavar="ACTION", required=True)
    clean = sub.add_parser("clean", help="remove network namespaces left by killed tap runs "
                           "(needs root when there are any)")
    clean.add_argument("--json", action="store_true", help='{"removed": [...], "running": [...]}')
    clean.set_defaults(func=cmd_net_clean)
