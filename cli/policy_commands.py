"""`runtime policy ...` and `runtime shadow report`: learning policies, and the shadow adapter against live serving."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cli.common import (
    USAGE_ERROR,
    ConfigOption,
    JsonOption,
    PolicyOption,
    ServerOption,
    admin_client,
    clip,
    console,
    fail,
    load,
    opened_store,
    remote_errors,
)
from policies import Policy, PolicyError, load_policy, policy_schema
from policies.shadow import ShadowReport, shadow_report

policy_app = typer.Typer(help="Learning policies: validate a file, print the JSON schema.", no_args_is_help=True)
shadow_app = typer.Typer(help="Shadow mode: compare the shadow adapter with live serving.", no_args_is_help=True)


@policy_app.command("validate")
def policy_validate(file: Path) -> None:
    """Check a policy file; every error names its line."""
    try:
        loaded = load_policy(file)
    except PolicyError as exc:
        fail(exc, USAGE_ERROR)
    console.print(
        f"[green]valid[/green]: policy '{loaded.name}': {len(loaded.protected)} protected behaviours, "
        f"{len(loaded.retention)} retention suite{'' if len(loaded.retention) == 1 else 's'}, "
        f"promotion {loaded.promotion.mode}"
    )


@policy_app.command("schema")
def policy_schema_cmd() -> None:
    """Print the JSON schema of a policy file."""
    sys.stdout.write(json.dumps(policy_schema(), indent=2) + "\n")


@shadow_app.command("report")
def shadow_report_cmd(
    config: ConfigOption = None,
    policy: PolicyOption = None,
    adapter: Annotated[str | None, typer.Option("--adapter", "-a", help="Default: the current shadow.")] = None,
    as_json: JsonOption = False,
    server: ServerOption = None,
) -> None:
    """Live and shadow answers compared: agreement, rule violations, feedback, and the policy's verdict (with a
    server running, by the server's policy)."""
    cfg = load(config)
    try:
        loaded = load_policy(policy or cfg.policy) if (policy or cfg.policy) else Policy()
    except PolicyError as exc:
        fail(exc, USAGE_ERROR)
    client = admin_client(cfg, server)
    if client is not None:
        with client, remote_errors():
            report = ShadowReport(**client.get("/admin/shadow-report", adapter=adapter))
    else:
        with opened_store(cfg, read_only=True) as store:
            report = shadow_report(store, loaded, adapter)
    if as_json:
        sys.stdout.write(json.dumps(report.to_dict(), indent=2) + "\n")
        return
    console.print(f"[bold]shadow adapter:[/bold] {report.adapter or '(none)'}   pairs: {report.pairs}")
    console.print(
        f"agreement (mean F1 with live): {report.agreement:.2f}   rule violations: shadow {report.shadow_violations}"
        f" / live {report.live_violations}   regressions on positively rated: {report.regressions}/"
        f"{report.rated_positive}   corrections already fixed: {report.fixes}/{report.corrected}"
    )
    console.print(f"[bold]verdict:[/bold] {report.verdict}: {'; '.join(report.reasons)}")
    if report.examples:
        table = Table(title="Recent pairs")
        for col in ("prompt", "live", "shadow", "F1"):
            table.add_column(col)
        for ex in report.examples:
            table.add_row(
                clip(ex["prompt"], 40), clip(ex["live"], 50), clip(ex["shadow"], 50), f"{ex['agreement']:.2f}"
            )
        console.print(table)
