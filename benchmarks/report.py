"""What the benchmark scripts share: a report that prints its lines and keeps them, verdicts, the figures' formats,
McNemar's exact test and the results file. Loaded from its file by the scripts beside it (``load_report_module``
pattern: sys.path untouched, since the scripts here are named like sdlearn's modules)."""

from __future__ import annotations

import math
import resource
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class Report:
    """Prints lines and keeps them (for ``--out``), and the verdict of each target."""

    def __init__(self):
        self.lines: list[str] = []
        self.verdicts: dict[str, tuple[str, bool | None]] = {}

    def say(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)

    def verdict(self, name: str, figure: str, met: bool | None) -> None:
        self.verdicts[name] = (figure, met)
        self.say(f"    → {'not measured' if met is None else 'MET' if met else 'MISSED'}")

    def write(self, path: Path) -> Path:
        """The report, written atomically to ``path`` (its folder made if needed)."""
        from sdlearn.checkpoint import atomic_write_bytes

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, ("\n".join(self.lines) + "\n").encode())
        print(f"report written to {path}")
        return path


def percent(x: float) -> str:
    return f"{100 * x:.1f}%"


def with_interval(result) -> str:
    """A prompt accuracy with its 95% interval and count: "97.3% [94.5%, 98.7%] of 256"."""
    low, high = result.interval
    return f"{percent(result.overall)} [{percent(low)}, {percent(high)}] of {result.count}"


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def sign_test_p(only_a: int, only_b: int) -> float:
    """Two-sided exact sign test (McNemar's exact test) on the d = a + b images right for one model only: under
    "equally good" a ~ Binomial(d, 1/2), p = min(1, 2 Σ_{k ≤ min(a, b)} C(d, k) / 2^d) (McNemar 1947)."""
    d = only_a + only_b
    return 1.0 if d == 0 else min(1.0, 2 * sum(math.comb(d, k) for k in range(min(only_a, only_b) + 1)) / 2**d)


def shown(path: Path | str) -> str:
    """A path as a results file should name it: relative to the repository when inside it (a reader's machine
    has another root), as given otherwise."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)
