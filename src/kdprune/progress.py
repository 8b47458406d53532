"""Progress a person can follow: a bar on a terminal, a plain line every few seconds otherwise."""

from __future__ import annotations

import sys
import time
from types import TracebackType

INTERVAL = 5.0  # seconds between plain progress lines when stderr is not a terminal


class Progress:
    """Counts steps of one piece of work; shows them with tqdm on a terminal, else prints
    `<desc>: <done>/<total> <unit>s (<rate>/s, <eta> s left)` at most every INTERVAL seconds."""

    muted = False  # a worker process (kdprune.workers) shows nothing: the stage's own process reports

    def __init__(self, desc: str, total: int, unit: str = "step") -> None:
        self.desc, self.total, self.unit = desc, total, unit
        self.done = 0
        self.start = self.last = time.monotonic()
        self.bar = None
        if sys.stderr.isatty() and not self.muted:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind: type | None, value: BaseException | None, tb: TracebackType | None) -> None:
        if self.bar is not None:
            self.bar.close()

    def step(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        if self.muted:
            return
        now = time.monotonic()
        if now - self.last >= INTERVAL:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            left = (self.total - self.done) / rate if rate else float("nan")
            self.say(f"{self.desc}: {self.done}/{self.total} {self.unit}s ({rate:.1f}/s, {left:.0f} s left)")

    @classmethod
    def mute(cls) -> None:
        """From now on, no bar and no line in this process."""
        cls.muted = True

    @classmethod
    def say(cls, line: str) -> None:
        """One line of progress on stderr, flushed at once."""
        if not cls.muted:
            print(line, file=sys.stderr, flush=True)
