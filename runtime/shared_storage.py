"""Directories on shared storage, named by fsspec URLs (``file:///mnt/shared/x``, ``s3://bucket/x``, ``memory://x``).

The adapter registry and the Ray executor move whole directories (an adapter, a base model) between a machine's
disk and a location every machine can read. Plain paths are not URLs: they are used as they are.
Non-local protocols need their fsspec package (``s3fs`` for ``s3://``, ``gcsfs`` for ``gs://``).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

COMPLETE_MARKER = ".complete"
"""Written into a downloaded directory last: a directory without it is a partial download and is fetched again."""


def is_url(location: str | os.PathLike[str] | None) -> bool:
    """Whether `location` is an fsspec URL (``scheme://...``) rather than a plain path."""
    return location is not None and "://" in str(location)


def join_url(location: str, *parts: str) -> str:
    """`location` with `parts` appended, ``/``-separated."""
    return "/".join([str(location).rstrip("/"), *(p.strip("/") for p in parts)])


def filesystem(url: str) -> tuple[Any, str]:
    """``(fsspec filesystem, path within it)`` for `url`; a clear error when its protocol's package is missing."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:
        raise ValueError(
            f"cannot open {url!r}: {exc}. Install the fsspec package for its protocol (s3fs for s3://, gcsfs for "
            "gs://, adlfs for az://) or use a plain path or file:// URL."
        ) from exc


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return bool(fs.exists(path))


def remove(url: str) -> None:
    """Remove the directory (or file) at `url`; nothing happens when it does not exist."""
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def list_files(url: str) -> dict[str, str]:
    """The files under the directory `url`, recursively: ``{relative name: path in its filesystem}``."""
    fs, root = filesystem(url)
    root = root.rstrip("/")
    if not fs.isdir(root):
        return {}
    return {found[len(root) + 1:]: found for found in sorted(fs.find(root, detail=False)) if found != root}


def upload_dir(local: str | Path, url: str, *, last: Iterable[str] = ()) -> None:
    """Copy the files of the local directory `local` to the directory `url`, the names in `last` after all others
    (a reader that finds one of those finds every other file already written)."""
    fs, root = filesystem(url)
    local = Path(local)
    final = set(last)
    files = sorted((f for f in local.rglob("*") if f.is_file()), key=lambda f: (f.name in final, str(f)))
    fs.makedirs(root, exist_ok=True)
    for file in files:
        target = join_url(root, file.relative_to(local).as_posix())
        fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        fs.put_file(str(file), target)


def download_dir(url: str, local: str | Path) -> Path:
    """Copy the directory `url` into the local directory `local` (replaced whole, with one rename, so a concurrent
    reader sees the old copy or the new one). Raises ``FileNotFoundError`` when `url` holds no files."""
    fs, _root = filesystem(url)
    files = list_files(url)
    if not files:
        raise FileNotFoundError(f"{url}: no such directory, or it holds no files")
    local = Path(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.parent / f".{local.name}.{uuid.uuid4().hex[:8]}.partial"
    try:
        for name, path in files.items():
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(path, str(target))
        (tmp / COMPLETE_MARKER).write_text(url)
        shutil.rmtree(local, ignore_errors=True)
        os.replace(tmp, local)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return local


def cached_download(url: str, local: str | Path) -> Path:
    """:func:`download_dir` unless `local` already holds a complete copy of `url` (for inputs that never change
    under one URL, such as a base model directory)."""
    local = Path(local)
    marker = local / COMPLETE_MARKER
    if marker.is_file() and marker.read_text() == url:
        return local
    return download_dir(url, local)
