"""Reading a policy file: every error names the file, the line and the key, and says what is allowed."""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from policies.schema import Policy
from runtime.yamlfile import describe_validation_error, read_yaml_mapping


class PolicyError(ValueError):
    """A policy file is invalid; the message lists every problem as ``file:line: key: problem``."""


def load_policy(path: str | Path) -> Policy:
    """Load and validate the policy at `path`; relative retention files are resolved against its directory.

    Raises :class:`PolicyError` for a missing file, malformed YAML, unknown keys, bad values, or a
    retention file that does not exist.
    """
    path = Path(path)
    data, lines = read_yaml_mapping(
        path, error=PolicyError, what="policy file", hint="sections (protected, retention, promotion, ...)",
        if_missing=" (check the path; `runtime policy validate FILE` checks a policy)",
    )
    try:
        policy = Policy.model_validate(data)
    except ValidationError as exc:
        raise PolicyError(describe_validation_error(exc, str(path), lines, Policy, title="invalid policy")) from None
    base = path.resolve().parent
    missing = []
    for i, suite in enumerate(policy.retention):
        file = Path(suite.file)
        if not file.is_absolute():
            file = base / file
        if not file.is_file():
            line = lines.get(("retention", str(i), "file"), lines.get(("retention", str(i))))
            missing.append(f"{path}:{line}: retention.{i}.file: {suite.file} does not exist (resolved to {file})")
        suite.file = str(file)
    if missing:
        raise PolicyError("invalid policy:\n  " + "\n  ".join(missing))
    return policy
