"""What a build reports: failed sources and the summary."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.terminal import printable
from pipeline.urls import scrub


@dataclass
class Failure:
    """A source that did not make it into the bank: which feature failed, and why."""

    id: str
    feature: str
    error: str

    def __post_init__(self) -> None:
        self.error = scrub(self.error)  # errors of fsspec and features may quote signed URLs

    def __str__(self) -> str:
        """One line, safe to print: control characters in the id, the feature and the error
        (which come from a bank or a source) are shown escaped."""
        where = f" (feature {self.feature})" if self.feature else ""
        return printable(f"{self.id!r}{where}: {self.error}")


@dataclass
class BuildSummary:
    """What a build did: counts, per-column rows and bytes, time, and the failures it recorded
    (``failures``; the bank keeps every build's in ``bank.failures()``).

    ``str(summary)`` is safe to print: control characters in paths, column
    names, notes and failures are shown escaped."""

    path: str
    ok: int
    failed: int
    skipped: int
    sources: int
    columns: dict[str, dict[str, Any]]
    failures: list[Failure] = field(default_factory=list)
    writer_seconds: float = 0.0
    seconds: float = 0.0
    writer_pid: int = 0
    action: str = "built"  # or "mapped f() into thumbs of", for bank.map
    notes: list[str] = field(default_factory=list)  # what the build did besides building

    @property
    def _had(self) -> str:
        return "in the bank" if self.action == "built" else "done"

    @property
    def rate(self) -> float:
        """Sources committed per second of wall time."""
        return self.ok / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        lines = [
            f"{self.action} {self.path}: {self.ok} sources ok, {self.failed} failed"
            + (f", {self.skipped} already {self._had}" if self.skipped else "")
            + f"; {self.sources} in the bank",
            f"  {self.seconds:.2f} s, {self.rate:,.0f} sources/s, writer busy {self.writer_seconds:.2f} s",
        ]
        for path, info in self.columns.items():
            lines.append(
                f"  {path:<24} {info['rows']:>10,} rows  {human_bytes(info['bytes']):>9}  "
                f"{info['dtype']} {tuple(info['shape'])}"
            )
        lines.extend(f"  note: {note}" for note in self.notes)
        for failure in self.failures[:10]:
            lines.append(f"  failed: {failure}")
        if len(self.failures) > 10:
            lines.append(f"  ... and {len(self.failures) - 10} more failures (bank.failures())")
        return "\n".join(printable(line) for line in lines)


def human_bytes(n: float) -> str:
    """``1234567`` -> ``"1.2 MB"`` (decimal units, as file managers show sizes)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{int(n)} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
