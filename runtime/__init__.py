"""The runtime: configuration, the DuckDB store, serving engines and the `runtime` CLI."""

__version__ = "0.1.0"
