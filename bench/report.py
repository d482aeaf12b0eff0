"""One line per figure, the same shape everywhere, so results can be grepped and compared."""

from __future__ import annotations

import time
from collections.abc import Callable


def line(name: str, value: float, unit: str, reference: float | None = None,
         ref_name: str = "", target: float | None = None) -> None:
    """Print `name value unit [reference, ratio, target]`."""
    text = f"{name:44} {value:10.3f} {unit}"
    if reference:
        ratio = value / reference
        text += f"   ref {ref_name} {reference:.3f} {unit}   ratio {ratio:.2f}"
        if target is not None:
            text += f" ({'meets' if ratio >= target else 'BELOW'} target {target:.2f})"
    print(text, flush=True)


def best_of(repeats: int, fn: Callable[[], object]) -> float:
    """Fastest wall time of `repeats` runs of fn (the least disturbed one)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best
