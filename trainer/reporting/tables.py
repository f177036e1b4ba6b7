"""The one table printer: the start-up table, the summary, the planner, the shard checker and the benchmarks."""

from __future__ import annotations

from collections.abc import Sequence

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text


def console(stderr: bool = False) -> Console:
    """A console that prints long lines rather than wrapping paths at 80 columns when it writes to a file."""
    out = Console(stderr=stderr)
    if not out.is_terminal:
        out.width = 160
    return out


def table(title: str | None = None, header: Sequence[str] | None = None) -> Table:
    """Without a header: name-value rows (the value folds). With one: columns, numbers right-aligned. Cells are
    plain text, never markup."""
    out = Table(title=title, title_justify="left", title_style="bold", show_header=header is not None,
                box=box.SIMPLE)
    if header is None:
        out.add_column(style="bold", no_wrap=True)
        out.add_column(overflow="fold")
    else:
        for i, name in enumerate(header):
            out.add_column(name, style="bold" if i == 0 else None, justify="left" if i == 0 else "right",
                           no_wrap=i == 0)
    return out


def print_table(out: Console, title: str | None, rows: Sequence[Sequence[str]],
                header: Sequence[str] | None = None) -> None:
    printed = table(title, header)
    for row in rows:
        printed.add_row(*(Text(cell) for cell in row))
    out.print(printed)
