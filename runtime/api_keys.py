"""API keys with roles: who may call which routes of ``runtime serve``, and under which name.

A keys file (YAML) lists each key's **principal** (the name its signals are recorded under), its **roles**
and the SHA-256 of the key; the key itself is shown once, when ``runtime keys add`` makes it, and never
stored. Roles:

- ``chat``: ``/v1/chat/completions`` and ``/v1/models``;
- ``feedback``: ratings and corrections of logged answers;
- ``teach``: ``/v1/teach`` and ``/v1/documents`` (new knowledge);
- ``admin``: the ``/admin`` routes and the dashboard's data (besides the admin token).

```yaml
keys:
  - principal: support-app
    roles: [chat, feedback]
    sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
```
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, field_validator

from runtime.strict_fields import StrictSection
from runtime.yamlfile import describe_validation_error, read_yaml_mapping

__all__ = ["ROLES", "ApiKey", "ApiKeys", "ApiKeysError", "Role", "add_key", "hash_key", "load_api_keys", "new_key"]

Role = Literal["chat", "feedback", "teach", "admin"]
ROLES: tuple[Role, ...] = ("chat", "feedback", "teach", "admin")
KEY_PREFIX = "rt-"


class ApiKeysError(ValueError):
    """A keys file is invalid or cannot be written; the message says where and what to do."""


class ApiKey(StrictSection):
    """One key: its principal, its roles and the SHA-256 (hex) of the key."""

    principal: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.@-]+$")
    roles: list[Role] = Field(min_length=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @field_validator("roles")
    @classmethod
    def _unique(cls, value: list[Role]) -> list[Role]:
        return list(dict.fromkeys(value))


class ApiKeys(StrictSection):
    """The keys file: every key, and lookups by presented key (constant time per key)."""

    keys: list[ApiKey] = Field(default_factory=list)

    @field_validator("keys")
    @classmethod
    def _unique_principals(cls, value: list[ApiKey]) -> list[ApiKey]:
        names = [k.principal for k in value]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"each principal may have one key; repeated: {', '.join(repeated)}")
        return value

    def authenticate(self, presented: str) -> ApiKey | None:
        """The key whose hash matches `presented`, or ``None``; every key is compared, in constant time."""
        digest = hash_key(presented)
        found = None
        for key in self.keys:
            if hmac.compare_digest(key.sha256, digest):
                found = key
        return found


def hash_key(key: str) -> str:
    """The SHA-256 (hex) of a key, as a keys file stores it."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def new_key() -> str:
    """A fresh random key (256 bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def load_api_keys(path: str | Path) -> ApiKeys:
    """Read and validate a keys file; :class:`ApiKeysError` names the file, line and key of any problem."""
    path = Path(path)
    data, lines = read_yaml_mapping(
        path, error=ApiKeysError, what="API keys file", hint="`keys: [...]`",
        if_missing=" (create it with `runtime keys add PRINCIPAL --roles chat --file FILE`)",
    )
    try:
        return ApiKeys.model_validate(data)
    except ValidationError as exc:
        raise ApiKeysError(
            describe_validation_error(exc, str(path), lines, ApiKeys, title="invalid API keys file")
        ) from None


def add_key(path: str | Path, principal: str, roles: list[Role]) -> str:
    """Make a key for `principal` with `roles`, record its hash in the keys file (created 0600 if missing, the
    principal's old key replaced) and return the key: the only time it is shown."""
    path = Path(path)
    keys = load_api_keys(path) if path.exists() else ApiKeys()
    key = new_key()
    try:
        entry = ApiKey(principal=principal, roles=roles, sha256=hash_key(key))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ApiKeysError(f"invalid key for {principal!r}: {problems}") from None
    kept = [k for k in keys.keys if k.principal != principal] + [entry]
    write_api_keys(path, ApiKeys(keys=kept))
    return key


def write_api_keys(path: str | Path, keys: ApiKeys) -> None:
    """Write a keys file atomically, readable by its owner only."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    text = yaml.safe_dump(keys.model_dump(mode="json"), sort_keys=False)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)
