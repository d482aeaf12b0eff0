"""Scenario results: rows of expected vs observed, as a table or JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Row:
    """One checked outcome. ``ok`` is whether observed is what the model expects."""

    scenario: str
    case: str
    expected: str
    observed: str
    where: str = "guest"  # guest: read back in the VM; host: checked on the media file

    @property
    def ok(self) -> bool:
        return self.expected == self.observed

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "ok": self.ok}


def format_table(rows: list[Row]) -> str:
    """The human table `mktme-emu scenario` prints."""
    header = ("scenario", "case", "where", "expected", "observed", "")
    lines = [header, *((r.scenario, r.case, r.where, r.expected, r.observed,
                        "ok" if r.ok else "DIFFERS") for r in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
            for line in lines]
    failed = sum(not r.ok for r in rows)
    text.append(f"{len(rows) - failed} as modelled, {failed} differ")
    return "\n".join(text)
