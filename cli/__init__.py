"""The `runtime` command line: configuration, the log, learning, signals, adapters, policies and the demo."""

from cli.app import app, run

__all__ = ["app", "run"]
