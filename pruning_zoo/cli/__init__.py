"""The `pruning-zoo` command line: each module parses one group of commands and calls the part that does the work.

Only typer, rich and pruning-zoo's pure-Python modules are imported here; each command imports what it needs
(torch, transformers, lmms-eval) when it runs, so `--help` answers at once and `list` never loads a model library.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from pruning_zoo.cli import bench, run, testbed, train
from pruning_zoo.cli.common import DEBUG_ENV, set_debug

app = typer.Typer(
    name="pruning-zoo",
    help="Compare visual-token pruning strategies for vision-language models on equal terms.\n\n"
    "Start with `pruning-zoo list` to see the strategies, model families and suites installed, then "
    "`pruning-zoo run --suite NAME --dry-run` to see what a sweep would evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def main_options(
    debug: Annotated[bool, typer.Option("--debug", help=f"Show the traceback of any error (or set {DEBUG_ENV}=1).")] = False,
) -> None:
    set_debug(debug)


app.command("list")(run.list_command)
app.command()(run.run)
app.command()(run.leaderboard)
app.add_typer(train.app, name="train")
app.add_typer(bench.app, name="bench")
app.add_typer(testbed.app, name="testbed")


def main() -> None:  # pragma: no cover - console-script shim
    app(prog_name="pruning-zoo")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
