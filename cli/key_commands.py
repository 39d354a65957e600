"""`runtime keys ...`: API keys with roles for `runtime serve --api-keys FILE` (see runtime.api_keys)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cli.common import USAGE_ERROR, JsonOption, console, fail, print_json
from runtime.api_keys import ROLES, ApiKeys, ApiKeysError, add_key, load_api_keys, write_api_keys

keys_app = typer.Typer(help="API keys with roles (chat, feedback, teach, admin) for `runtime serve --api-keys`.")

FileOption = Annotated[Path, typer.Option("--file", "-f", help="The keys file (YAML; hashes only).")]


@keys_app.command("add")
def keys_add(
    principal: Annotated[str, typer.Argument(help="Who the key belongs to; signals are recorded under this name.")],
    roles: Annotated[str, typer.Option("--roles", help=f"Comma-separated: {', '.join(ROLES)}.")],
    file: FileOption = Path("api-keys.yaml"),
) -> None:
    """Make a key for PRINCIPAL (replacing its old one) and print it: it is shown only this once."""
    chosen = [r.strip() for r in roles.split(",") if r.strip()]
    unknown = [r for r in chosen if r not in ROLES]
    if not chosen or unknown:
        fail(f"--roles takes {', '.join(ROLES)}; got {roles!r}", USAGE_ERROR)
    try:
        key = add_key(file, principal, chosen)  # type: ignore[arg-type]
    except ApiKeysError as exc:
        fail(exc, USAGE_ERROR)
    console.print(f"key of [bold]{principal}[/bold] ({', '.join(chosen)}), recorded in {file}; keep it now, it "
                  "is not stored:")
    typer.echo(key)


@keys_app.command("list")
def keys_list(file: FileOption = Path("api-keys.yaml"), as_json: JsonOption = False) -> None:
    """List principals and their roles (the keys themselves are not stored)."""
    try:
        keys = load_api_keys(file)
    except ApiKeysError as exc:
        fail(exc, USAGE_ERROR)
    if as_json:
        print_json([{"principal": k.principal, "roles": k.roles} for k in keys.keys])
        return
    table = Table(title=f"API keys in {file}")
    table.add_column("principal")
    table.add_column("roles")
    for key in keys.keys:
        table.add_row(key.principal, ", ".join(key.roles))
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(
    principal: Annotated[str, typer.Argument(help="Whose key to remove.")],
    file: FileOption = Path("api-keys.yaml"),
) -> None:
    """Remove PRINCIPAL's key (a running server keeps the keys it loaded until it restarts)."""
    try:
        keys = load_api_keys(file)
    except ApiKeysError as exc:
        fail(exc, USAGE_ERROR)
    kept = [k for k in keys.keys if k.principal != principal]
    if len(kept) == len(keys.keys):
        fail(f"no key of {principal!r} in {file}")
    write_api_keys(file, ApiKeys(keys=kept))
    console.print(f"revoked the key of {principal}; restart `runtime serve` for it to take effect")
