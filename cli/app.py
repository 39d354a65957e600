"""The `runtime` command line, assembled from the command modules of this package.

`runtime serve` is added by :mod:`server.command` (the server sits above the CLI); the console script runs
:func:`server.command.main`.
"""

from __future__ import annotations

import os

import typer

from cli.adapter_commands import adapters_app, decisions_cmd
from cli.demo import demo_cmd
from cli.key_commands import keys_app
from cli.learn_commands import ingest_cmd, learn_cmd
from cli.log_commands import config_app, log_cmd
from cli.log_shipping_commands import logs_app
from cli.policy_commands import policy_app, shadow_app
from cli.signal_commands import signals_app

app = typer.Typer(
    help="An agent that keeps learning from its own use. See README.md.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"runtime {version('learning-runtime')}")
        except PackageNotFoundError:
            typer.echo("runtime (not installed as a package)")
        raise typer.Exit()


@app.callback()
def _main(
    show_version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the version and exit."),
) -> None:
    """An agent that keeps learning from its own use. See README.md."""


app.add_typer(config_app, name="config")
app.command("log")(log_cmd)
app.add_typer(logs_app, name="logs")
app.command("learn")(learn_cmd)
app.command("ingest")(ingest_cmd)
app.add_typer(signals_app, name="signals")
app.add_typer(keys_app, name="keys")
app.add_typer(adapters_app, name="adapters")
app.command("decisions")(decisions_cmd)
app.add_typer(policy_app, name="policy")
app.add_typer(shadow_app, name="shadow")
app.command("demo")(demo_cmd)


def run(command: typer.Typer = app) -> None:
    """Run the command line (the libraries' own progress bars off: the CLI draws its own)."""
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    command()
