"""VM figures: boot-to-command time and guest DAX throughput, emulated vs plain NVDIMM."""

from __future__ import annotations


def run(quick: bool = False) -> None:
    print("vm benchmarks: not yet wired (launcher pending)")
