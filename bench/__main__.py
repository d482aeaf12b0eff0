"""Run every benchmark section, or those named: ``python -m bench [xts] [backend] [vm]``."""

from __future__ import annotations

import argparse
import sys

from . import backend, sizes, vm, xts

SECTIONS = {"xts": xts.run, "backend": backend.run, "sizes": sizes.run, "vm": vm.run}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("sections", nargs="*", metavar="SECTION",
                        help=f"one of {', '.join(SECTIONS)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    args = parser.parse_args()
    unknown = [name for name in args.sections if name not in SECTIONS]
    if unknown:
        parser.error(f"unknown section {unknown[0]!r} (choose from {', '.join(SECTIONS)})")
    args.sections = args.sections or list(SECTIONS)
    for name in args.sections:
        print(f"== {name}", flush=True)
        SECTIONS[name](quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
