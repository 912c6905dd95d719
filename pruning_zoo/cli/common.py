"""What every command shares: one line per error with its exit code, interrupts that say what was kept, option
checks typer lacks, and tables that fit the terminal."""

from __future__ import annotations

import contextlib
import math
import os

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pruning_zoo.errors import PruningZooError, describe
from pruning_zoo.strategy.params import parse_param_overrides  # noqa: F401 - the commands import it from here

#: More data-loader processes than any machine runs usefully: a larger count is a typo that would fork thousands.
MAX_WORKERS = 256


def not_nan(value: float, option: str) -> float:
    """typer's range check lets NaN through (every comparison with it is false)."""
    if value != value:
        raise typer.BadParameter(f"{value} is not a number", param_hint=option)
    return value


def finite(value: float, option: str) -> float:
    if not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number", param_hint=option)
    return value


DEBUG_ENV = "PRUNING_ZOO_DEBUG"
_debug = False


def set_debug(debug: bool) -> None:
    """`--debug` given to the program, before its command."""
    global _debug
    _debug = debug


def debugging() -> bool:
    return _debug or os.environ.get(DEBUG_ENV, "") not in {"", "0"}


def print_error(text: str) -> None:
    Console(stderr=True).print(f"[bold red]error:[/] {escape(text)}", highlight=False, soft_wrap=True)


@contextlib.contextmanager
def interruptible():
    """SIGINT and SIGTERM raise KeyboardInterrupt while a long command runs, so that it says what it finished and
    how to go on; also where the shell started it with SIGINT ignored (a background job of a script)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(number, frame):
        raise KeyboardInterrupt(signal.Signals(number).name)

    previous = {number: signal.signal(number, interrupt) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


@contextlib.contextmanager
def user_errors():
    """Every error as one clear message, without a traceback (unless debugging): pruning-zoo's own errors with
    their exit code (2: the input is wrong, 1: something it needs failed), any other as a fault of ours (1)."""
    try:
        yield
    except (typer.Exit, typer.Abort, click.ClickException, KeyboardInterrupt):
        raise
    except PruningZooError as error:
        if debugging():
            raise
        print_error(str(error))
        raise typer.Exit(code=error.exit_code) from None
    except Exception as error:  # noqa: BLE001 - the last net: a message, never a bare traceback
        if debugging():
            raise
        print_error(f"{describe(error)}\nThis is a fault of pruning-zoo, not of your input: rerun with --debug "
                    f"(or {DEBUG_ENV}=1) for the traceback, and report it. Finished results are kept.")
        raise typer.Exit(code=1) from None


def fitted(title: str, headers: list[str], rows: list[list[str]], console: Console):
    """A table whose columns are at least as wide as their longest word, where that fits the terminal; else one
    block per row (its first cell, then each other column as `header  value`). No word is broken across lines."""
    columns = [[header, *(row[index] for row in rows)] for index, header in enumerate(headers)]
    shortest = [max(len(word) for text in column for word in [*text.split(), ""]) for column in columns]
    widest = [max(len(text) for text in column) for column in columns]
    # No outer border or edge padding: each column takes 2 of padding and 1 of separator, less 3 at the edges.
    spare = console.width - (sum(shortest) + 3 * len(headers) - 3)
    if spare >= 0:
        # rich would narrow the widest columns first, below their longest word: share out the spare width here.
        wants = [full - least for full, least in zip(widest, shortest)]
        share = min(1.0, spare / sum(wants)) if sum(wants) else 0.0
        table = Table(title=title, show_edge=False, pad_edge=False)
        for header, least, want in zip(headers, shortest, wants):
            table.add_column(header, width=least + int(want * share), overflow="fold")
        for row in rows:
            table.add_row(*row)
        return table
    blocks = Table(title=title, show_header=False, box=None, padding=(0, 1), expand=True)
    blocks.add_column(overflow="fold", no_wrap=True)
    blocks.add_column(overflow="fold", ratio=1)
    for row in rows:
        blocks.add_row(f"[bold]{escape(row[0])}[/]", "")
        for header, value in zip(headers[1:], row[1:]):
            blocks.add_row(f"  {header}", value)
    return blocks
