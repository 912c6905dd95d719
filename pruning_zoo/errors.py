"""Errors a user can act on: each says what was wrong, what was expected and what to do."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class PruningZooError(Exception):
    """Base class of every error pruning-zoo raises on bad input; the CLI prints it without a traceback and exits
    with `exit_code`: 2 for a usage error (the command or its inputs are wrong), 1 for a failure (they are right,
    but something they need is missing or broke)."""

    exit_code = 2


class UnknownNameError(PruningZooError, KeyError):
    """A strategy, model family, suite or plugin name that is not registered."""

    def __init__(self, kind: str, name: str, known: Iterable[str]):
        self.kind, self.name, self.known = kind, name, sorted(known)
        super().__init__(unknown_name_message(kind, name, self.known))

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]

    def with_hint(self, hint: str) -> "UnknownNameError":
        """The same error with what to do appended."""
        self.args = (f"{self.args[0]}. {hint}",)
        return self


class InvalidParameterError(PruningZooError, ValueError):
    """A strategy parameter, budget or option value outside what is allowed."""


class PluginError(PruningZooError):
    """A plugin that cannot be loaded, or that registers something wrongly."""


class SetupError(PruningZooError):
    """Something every cell needs is missing (a model that cannot be loaded, a task's data that cannot be
    reached): the sweep stops at once, writes nothing for the cells it could not run and keeps the finished ones."""

    exit_code = 1


class OutputBusyError(PruningZooError):
    """Another process is writing the same output folder."""

    exit_code = 1


class StrategyOutputError(PruningZooError):
    """A strategy returned a selection the engine cannot apply (wrong count, invalid indices or features): a
    fault of that strategy's code on this input, not of the user's options."""

    exit_code = 1


class Problems:
    """Collects every problem of a command's inputs so that one error names them all, not only the first."""

    def __init__(self):
        self.found: list[PruningZooError] = []

    def check(self, function, *args, **kwargs):
        """`function(*args, **kwargs)`, or None with its PruningZooError collected."""
        try:
            return function(*args, **kwargs)
        except PruningZooError as error:
            self.add(error)
            return None

    def add(self, error: PruningZooError) -> None:
        if all(str(error) != str(found) for found in self.found):  # one budget, many strategies: said once
            self.found.append(error)

    def raise_if_any(self, heading: str) -> None:
        """One error listing every problem; a usage error (exit 2) if any of them is one, else a failure."""
        if not self.found:
            return
        usage = [error for error in self.found if error.exit_code == 2]
        kind = InvalidParameterError if usage else SetupError
        if len(self.found) == 1:
            raise kind(f"{heading}: {self.found[0]}")
        raise kind(f"{heading} ({len(self.found)} problems):\n- " + "\n- ".join(str(e) for e in self.found))


def closest(name: str, known: Iterable[str]) -> str | None:
    """The known name closest to `name`, comparing case-insensitively; None if nothing is close."""
    by_lower = {k.lower(): k for k in known}
    match = difflib.get_close_matches(name.lower(), list(by_lower), n=1, cutoff=0.6)
    return by_lower[match[0]] if match else None


def unknown_name_message(kind: str, name: str, known: Iterable[str]) -> str:
    known = sorted(known)
    message = f"unknown {kind} {name!r}"
    suggestion = closest(name, known)
    if suggestion is not None:
        message += f"; did you mean {suggestion!r}?"
    listed = ", ".join(known) if known else "(none registered)"
    return f"{message} known: {listed}"


def describe(error: BaseException) -> str:
    """A one-line account of an error: our own messages as they are, others with their type."""
    return str(error) if isinstance(error, PruningZooError) else f"{type(error).__name__}: {error}"
