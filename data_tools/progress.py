"""Progress of a packing rank: a rich bar (videos/s, ETA) on an interactive terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress
from rich.text import Text


class _Rate(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed or 0:.2f} videos/s")


class Progress:
    """`advance()` once per input; `note(msg)` once per shard. Only an enabled, interactive one draws a bar."""

    def __init__(self, total: int, enabled: bool, say: Callable[[str], None]):
        self.total, self.done, self.say, self.start = total, 0, say, time.perf_counter()
        self.bar = None
        if enabled and sys.stderr.isatty():
            self.bar = RichProgress(TextColumn("packing"), BarColumn(), MofNCompleteColumn(), _Rate(),
                                    TextColumn("eta"), TimeRemainingColumn(), console=Console(stderr=True))
            self.task = self.bar.add_task("packing", total=total)

    def __enter__(self) -> Progress:
        if self.bar:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar:
            self.bar.stop()

    def advance(self) -> None:
        self.done += 1
        if self.bar:
            self.bar.advance(self.task)

    def note(self, message: str) -> None:
        elapsed = time.perf_counter() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        line = f"{message} ({self.done}/{self.total} inputs, {rate:.2f} videos/s, eta {eta:.0f} s)"
        if self.bar:
            self.bar.console.print(line)
        else:
            self.say(line)
