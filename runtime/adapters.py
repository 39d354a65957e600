"""The adapter registry: published LoRA adapters on disk, indexed (with lineage) in the store.

Layout under ``adapters_dir``::

    staging/<run_id>/      a run writes here; never loaded by anything
    <name>/                a published adapter (adapter_config.json, adapter_model.safetensors, lineage.json)

Publishing verifies the staged adapter (config parses, weights load, all finite, non-empty), computes a
checksum, writes ``lineage.json`` and moves the directory into place with one ``rename``, so a reader sees
either no adapter or a whole one. Only then is the adapter recorded in the store.

``adapters_dir`` may also be an fsspec URL that every replica can read (``s3://bucket/adapters``,
``file:///mnt/shared/adapters``). Then runs stage on local disk (``<cache_dir>/staging/<run_id>``), publishing
uploads the adapter to ``<url>/<name>/`` with ``lineage.json`` written last (an adapter directory without it is
incomplete), the store records the URL as the adapter's path, and every reader goes through
:func:`fetch_adapter`: a copy in a local cache whose checksum is verified against the registry record before
anything loads it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from runtime import shared_storage
from runtime.engines import Engine
from runtime.store import AdapterRecord, AdapterRole, Store

ADAPTER_CONFIG = "adapter_config.json"
LINEAGE_FILE = "lineage.json"


class AdapterVerificationError(RuntimeError):
    """A staged adapter is incomplete or corrupt; it was not published."""


@dataclass(frozen=True)
class Lineage:
    """Where an adapter came from."""

    parent: str | None
    method: str
    run_id: str
    data_counts: dict[str, Any]
    metrics: dict[str, Any]
    role: AdapterRole = "serving"


ADAPTER_FILE_MODE = 0o640
"""Published adapter files: readable by the owner's group (a vLLM or SGLang server running as another user of the
same group loads them), by nobody else; directories ``0o750``."""


def _share_with_group(path: Path) -> None:
    path.chmod(0o750)
    for item in path.rglob("*"):
        item.chmod(0o750 if item.is_dir() else ADAPTER_FILE_MODE)


def adapter_checksum(path: str | Path) -> str:
    """SHA-256 over the adapter's config and weight files (names and bytes), in name order."""
    digest = hashlib.sha256()
    for file in sorted(Path(path).iterdir()):
        if file.is_file() and file.name not in (LINEAGE_FILE, shared_storage.COMPLETE_MARKER):
            digest.update(file.name.encode())
            with file.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def verify_adapter(path: str | Path) -> dict[str, Any]:
    """Check that `path` holds a loadable PEFT adapter; returns its config. Raises `AdapterVerificationError`."""
    import torch
    from safetensors.torch import load_file

    path = Path(path)
    config_file = path / ADAPTER_CONFIG
    if not config_file.is_file():
        raise AdapterVerificationError(f"{path}: no {ADAPTER_CONFIG}")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterVerificationError(f"{config_file}: not valid JSON ({exc})") from None
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        raise AdapterVerificationError(f"{path}: no adapter_model.safetensors")
    try:
        tensors = load_file(str(weights))
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise AdapterVerificationError(f"{weights}: cannot be loaded ({exc})") from None
    if not tensors:
        raise AdapterVerificationError(f"{weights}: holds no tensors")
    bad = [name for name, t in tensors.items() if not torch.isfinite(t).all()]
    if bad:
        raise AdapterVerificationError(f"{weights}: non-finite values in {bad[:3]}")
    return config


def recorded_checksum(adapter_dir: str | Path) -> str | None:
    """The checksum in the adapter's own ``lineage.json`` (written at publishing); ``None`` when there is none."""
    lineage = Path(adapter_dir) / LINEAGE_FILE
    try:
        return json.loads(lineage.read_text()).get("checksum")
    except (OSError, ValueError, AttributeError):
        return None


def _remote_checksum(location: str) -> str | None:
    fs, path = shared_storage.filesystem(shared_storage.join_url(location, LINEAGE_FILE))
    try:
        return json.loads(fs.cat_file(path)).get("checksum")
    except FileNotFoundError:
        return None
    except (ValueError, AttributeError) as exc:
        raise AdapterVerificationError(f"{location}/{LINEAGE_FILE} is not valid JSON ({exc})") from None


def fetch_adapter(location: str | Path, checksum: str | None, cache_dir: str | Path) -> Path:
    """A local copy of the adapter at `location`, verified, for an engine to load: what a replica calls before
    ``engine.load_adapter``.

    Args:
        location: the adapter's path as the registry records it (``AdapterRecord.path``): a local directory, or
            an fsspec URL such as ``s3://bucket/adapters/rewrite-20261121-101500-3`` or
            ``file:///mnt/shared/adapters/...``.
        checksum: the checksum the registry recorded at publishing (``AdapterRecord.checksum``). Pass it whenever
            you have it: it is what proves the files are the ones the gate approved. ``None`` checks against the
            ``lineage.json`` inside the adapter directory instead, which catches a corrupt or partial copy but
            not files replaced together with their lineage.
        cache_dir: a local directory for downloaded copies, one subdirectory per adapter and checksum (reused
            while it still verifies; safe to delete at any time).

    Returns:
        A local directory holding exactly the verified files: `location` itself when it is a local path (verified
        in place), else the copy under `cache_dir`.

    Raises:
        AdapterVerificationError: the adapter is missing, incomplete (no ``lineage.json``: a publish still
            running or one that crashed) or does not match the checksum. Nothing is left in the cache then, and
            the caller must not load anything.
        ValueError: `location` is a URL whose protocol has no fsspec package installed (e.g. ``s3fs``).
    """
    if not shared_storage.is_url(location):
        path = Path(location)
        if not path.is_dir():
            raise AdapterVerificationError(f"{path}: no adapter directory there")
        _check_checksum(path, checksum or recorded_checksum(path), str(location))
        return path
    location = str(location).rstrip("/")
    remote = _remote_checksum(location)
    if remote is None:
        raise AdapterVerificationError(
            f"{location}: no {LINEAGE_FILE}, so the adapter is missing or incomplete (its publishing has not "
            "finished, or crashed); nothing was loaded. Retry once the registry lists it."
        )
    expected = checksum or remote
    name = location.rsplit("/", 1)[-1]
    cache = Path(cache_dir)
    target = cache / f"{name}-{expected[:16]}"
    if target.is_dir():
        if adapter_checksum(target) == expected:
            return target
        shutil.rmtree(target, ignore_errors=True)  # a damaged cached copy: fetch it again
    partial = cache / f".{name}-{uuid.uuid4().hex[:8]}"
    try:
        shared_storage.download_dir(location, partial)
        _check_checksum(partial, expected, location)
        try:
            os.replace(partial, target)
        except OSError:  # another process fetched the same adapter meanwhile: keep its copy if it verifies
            if not (target.is_dir() and adapter_checksum(target) == expected):
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def _check_checksum(path: Path, expected: str | None, location: str) -> None:
    if expected is None:
        raise AdapterVerificationError(
            f"{location}: no checksum to verify against (none given and no {LINEAGE_FILE}); nothing was loaded"
        )
    actual = adapter_checksum(path)
    if actual != expected:
        raise AdapterVerificationError(
            f"{location}: its files do not match the registry checksum ({actual[:12]}... instead of "
            f"{expected[:12]}...): changed or corrupted after publishing; nothing was loaded. Restore the adapter "
            "or roll back to another one."
        )


def default_adapter_cache(location: str) -> Path:
    """Where local copies of the adapters of the registry at `location` go by default."""
    from runtime.models import default_cache_dir

    key = hashlib.sha256(location.encode()).hexdigest()[:12]
    return default_cache_dir() / "adapters" / key


class AdapterRegistry:
    """Published adapters in `root`, recorded in `store`.

    `root` is a local directory or an fsspec URL every replica can read (see the module docstring); with a URL,
    runs stage and readers cache under `cache_dir` (default :func:`default_adapter_cache`).
    """

    def __init__(self, root: str | Path, store: Store, *, cache_dir: str | Path | None = None) -> None:
        self.store = store
        self.url: str | None = str(root).rstrip("/") if shared_storage.is_url(root) else None
        if self.url is not None:
            self.cache_dir = Path(cache_dir) if cache_dir is not None else default_adapter_cache(self.url)
            self.root = self.cache_dir
            """The registry's directory; for a URL registry, its local cache (staging and fetched copies)."""
        else:
            self.root = Path(root)
            self.cache_dir = Path(cache_dir) if cache_dir is not None else self.root / "fetched"
        self.staging_root = self.root / "staging"

    def staging_dir(self, run_id: str) -> Path:
        """A fresh, empty staging directory for a run (an old one is removed)."""
        path = self.staging_root / run_id
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def discard_staging(self, run_id: str) -> None:
        shutil.rmtree(self.staging_root / run_id, ignore_errors=True)

    def new_name(self, method: str) -> str:
        """A unique, sortable adapter name like ``sdft-20261121-101500-3``."""
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        n = len(self.store.adapters()) + 1
        name = f"{method}-{stamp}-{n}"
        while self._exists(name) or self.store.get_adapter(name) is not None:
            n += 1
            name = f"{method}-{stamp}-{n}"
        return name

    def publish(self, staged: str | Path, name: str, lineage: Lineage) -> AdapterRecord:
        """Verify `staged`, move it to ``root/name`` atomically and record it as a ``candidate``."""
        staged = Path(staged)
        verify_adapter(staged)
        checksum = adapter_checksum(staged)
        target: str | Path = self.location_of(name)
        if self._exists(name):
            raise FileExistsError(f"adapter {name!r} already exists at {target}")
        parent_record = self.store.get_adapter(lineage.parent) if lineage.parent else None
        ancestry = [*parent_record.lineage, parent_record.name] if parent_record else []
        (staged / LINEAGE_FILE).write_text(
            json.dumps(
                {
                    "name": name,
                    "parent": lineage.parent,
                    "lineage": ancestry,
                    "method": lineage.method,
                    "role": lineage.role,
                    "run_id": lineage.run_id,
                    "data_counts": lineage.data_counts,
                    "metrics": lineage.metrics,
                    "checksum": checksum,
                },
                indent=2,
            )
        )
        if self.url is not None:
            # lineage.json last: it marks the directory complete (fetch_adapter refuses one without it)
            shared_storage.upload_dir(staged, str(target), last=(LINEAGE_FILE,))
            shutil.rmtree(staged, ignore_errors=True)
        else:
            _share_with_group(staged)
            self.root.mkdir(parents=True, exist_ok=True)
            os.replace(staged, target)  # atomic on one filesystem: staging lives under root
        return self.store.upsert_adapter(
            name,
            target,
            parent=lineage.parent,
            method=lineage.method,
            run_id=lineage.run_id,
            status="candidate",
            checksum=checksum,
            metrics={**lineage.metrics, "data_counts": lineage.data_counts},
            lineage=ancestry,
            role=lineage.role,
        )

    def active(self) -> AdapterRecord | None:
        """The adapter currently serving (``None``: the base model)."""
        actives = self.store.adapters(status="active")
        return actives[-1] if actives else None

    def activate(self, name: str, *, reason: str = "promoted", run_id: str | None = None) -> AdapterRecord:
        """Make `name` the active adapter; the previously active one is retired (the engine is told separately).

        The switch is recorded as a ``promote`` decision naming the previous active adapter, which is what
        :meth:`rollback` restores. The adapter's files must still match the checksum taken at publishing.
        """
        record = self._require(name)
        self.verify(record)
        previous = self.active()
        for old in self.store.adapters(status="active"):
            if old.name != name:
                self.store.set_adapter_status(old.name, "retired")
        self.store.set_adapter_status(name, "active")
        self.store.record_decision(
            name, "promote", reasons=[reason],
            checks={"previous_active": previous.name if previous else None}, run_id=run_id,
        )
        return self._require(name)

    def shadow(
        self, name: str, *, reason: str = "approved for shadow mode", run_id: str | None = None
    ) -> AdapterRecord:
        """Put `name` in shadow mode (it answers mirrored traffic only); an earlier shadow is retired."""
        record = self._require(name)
        self.verify(record)
        for old in self.store.adapters(status="shadow"):
            if old.name != name:
                self.retire(old.name, reason=f"replaced in shadow mode by {name}")
        self.store.set_adapter_status(name, "shadow")
        self.store.record_decision(name, "shadow", reasons=[reason], run_id=run_id)
        return self._require(name)

    def current_shadow(self) -> AdapterRecord | None:
        """The adapter in shadow mode, if any."""
        shadows = self.store.adapters(status="shadow")
        return shadows[-1] if shadows else None

    def retire(self, name: str, *, reason: str, checks: Any = None) -> AdapterRecord:
        """Take `name` out of service (a shadow or a candidate that will not be promoted)."""
        record = self._require(name)
        if record.status == "active":
            raise ValueError(f"{name!r} is the active adapter; roll back or promote another instead of retiring it")
        self.store.set_adapter_status(name, "retired")
        self.store.record_decision(name, "retire", reasons=[reason], checks=checks)
        return self._require(name)

    def previous_active(self) -> tuple[AdapterRecord | None, str | None]:
        """``(current active, the adapter it replaced)``: what :meth:`rollback` would swap (``None`` = base)."""
        current = self.active()
        if current is None:
            return None, None
        promotions = self.store.decisions(1, adapter=current.name, decision="promote")
        previous = (promotions[0].checks or {}).get("previous_active") if promotions else None
        return current, previous

    def rollback(self, *, reason: str = "rolled back by operator") -> AdapterRecord | None:
        """Restore the adapter that was active before the current one; returns it (``None``: the base model).

        The current active adapter is marked ``rolled_back``. Raises ``LookupError`` when the base model is
        already serving (nothing to roll back).
        """
        current, previous = self.previous_active()
        if current is None:
            raise LookupError("the base model is serving: there is nothing to roll back")
        restored = None
        if previous is not None:
            restored = self._require(previous)
            self.verify(restored)
        self.store.set_adapter_status(current.name, "rolled_back")
        if restored is not None:
            self.store.set_adapter_status(restored.name, "active")
        self.store.record_decision(
            current.name, "rollback", reasons=[reason], checks={"restored": previous},
        )
        return self._require(previous) if previous is not None else None

    def _require(self, name: str) -> AdapterRecord:
        record = self.store.get_adapter(name)
        if record is None:
            raise KeyError(f"no adapter named {name!r}; see `runtime adapters list`")
        return record

    def location_of(self, name: str) -> str | Path:
        """Where the adapter `name` is (or would be) published: a path, or a URL for a URL registry."""
        return shared_storage.join_url(self.url, name) if self.url is not None else self.root / name

    def _exists(self, name: str) -> bool:
        location = self.location_of(name)
        return shared_storage.exists(str(location)) if self.url is not None else Path(location).exists()

    def verify(self, record: AdapterRecord) -> None:
        """Raise :class:`AdapterVerificationError` unless `record`'s files match the checksum recorded at publishing."""
        self.local_copy(record)

    def local_copy(self, record: AdapterRecord) -> Path:
        """A local directory holding `record`'s files, verified against its recorded checksum: the adapter's own
        directory, or for an adapter on shared storage a copy under ``cache_dir`` (:func:`fetch_adapter`).
        Raises :class:`AdapterVerificationError`."""
        if shared_storage.is_url(record.path):
            return fetch_adapter(record.path, record.checksum, self.cache_dir)
        if not Path(record.path).is_dir() or adapter_checksum(record.path) != record.checksum:
            raise AdapterVerificationError(
                f"adapter {record.name!r} at {record.path} is missing or does not match its recorded checksum; "
                "it was changed on disk after publishing. Re-train it or restore the directory."
            )
        return Path(record.path)

    def load_into(self, engine: Engine, record: AdapterRecord) -> None:
        """Load a registry adapter into `engine`, its checksum verified first. Every load goes through here (by
        name, at start-up, on promotion, for the gate), so files changed on disk are never served."""
        load_shared = getattr(engine, "load_shared_adapter", None)
        if load_shared is not None and shared_storage.is_url(record.path):
            # replicas elsewhere read the shared location themselves and verify the checksum before loading
            load_shared(record.name, record.path, record.checksum)
            return
        engine.load_adapter(record.name, str(self.local_copy(record)))

    def fall_back(self, record: AdapterRecord, reason: str) -> AdapterRecord | None:
        """`record` (active) cannot serve: activate its nearest ancestor whose files verify, else nothing (the base
        model). The change is recorded as a ``rollback`` decision with `reason`; returns what serves now."""
        restored = None
        for name in reversed(record.lineage):
            ancestor = self.store.get_adapter(name)
            if ancestor is None or ancestor.role != "serving" or ancestor.status == "rejected":
                continue
            try:
                self.verify(ancestor)
            except AdapterVerificationError:
                continue
            restored = ancestor
            break
        self.store.set_adapter_status(record.name, "rolled_back")
        if restored is not None:
            self.store.set_adapter_status(restored.name, "active")
        self.store.record_decision(
            record.name, "rollback", reasons=[reason], checks={"restored": restored.name if restored else None},
        )
        return self._require(restored.name) if restored is not None else None
