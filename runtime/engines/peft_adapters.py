"""PEFT adapters on one base model: load, replace and unload them safely, and plan per-row adapter use.

The base model is wrapped in a ``PeftModel`` when the first adapter is loaded and unwrapped again when the
last one is unloaded. Public adapter names map to internal PEFT names (``adapter1``, ``adapter2``...), so
that a replacement can be loaded beside the old weights and swapped in only once it loaded completely.

Not thread-safe by itself: the engine serialises all use under its lock.
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from runtime.engines.errors import AdapterExistsError, AdapterLoadError, UnknownAdapterError

__all__ = ["AdapterSet", "BatchPart", "BASE"]

BASE = "__base__"
"""PEFT's name for "no adapter" in mixed-adapter batches."""

_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass
class BatchPart:
    """Rows of a batch that run together, the extra model kwargs and the context to run them in."""

    rows: list[int]
    kwargs: dict[str, Any] = field(default_factory=dict)
    context: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext


@dataclass
class _Loaded:
    internal: str
    path: Path
    mixed_batch: bool  # plain LoRA: can share a batch with other adapters via `adapter_names`


class AdapterSet:
    """The adapters loaded on a base model, and the model to run (the base or its ``PeftModel``)."""

    def __init__(self, base: torch.nn.Module) -> None:
        self._base = base
        self._peft: Any = None  # peft.PeftModel once an adapter is loaded
        self._loaded: dict[str, _Loaded] = {}
        self._counter = itertools.count(1)

    @property
    def model(self) -> torch.nn.Module:
        """The module to call: the ``PeftModel`` while adapters are loaded, else the base model."""
        return self._peft if self._peft is not None else self._base

    def names(self) -> list[str]:
        """Loaded adapter names, in load order."""
        return list(self._loaded)

    def path(self, name: str) -> Path:
        """Directory the adapter was loaded from."""
        return self._get(name).path

    def check(self, name: str) -> None:
        """Raise :class:`UnknownAdapterError` unless ``name`` is loaded."""
        self._get(name)

    def _get(self, name: str) -> _Loaded:
        try:
            return self._loaded[name]
        except KeyError:
            raise UnknownAdapterError(name, self.names()) from None

    # -- loading ------------------------------------------------------------------------------------
    def load(self, name: str, path: str | Path, *, replace: bool = False) -> None:
        """Load the adapter in ``path`` as ``name``; on any failure nothing changes.

        With ``replace``, an existing ``name`` is swapped for the new weights only after they loaded.
        """
        if not isinstance(name, str) or not name or name == BASE:
            raise ValueError(f"Invalid adapter name {name!r}")
        if name in self._loaded and not replace:
            raise AdapterExistsError(
                f"An adapter named {name!r} is already loaded; unload it first or pass replace=True."
            )
        path = Path(path).expanduser()
        config = _read_config(path)
        internal = f"adapter{next(self._counter)}"
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            self._load_weights(internal, path, config)
        old = self._loaded.get(name)
        self._loaded[name] = _Loaded(internal, path, _is_plain_lora(config))
        if old is not None:
            self._delete(old.internal)

    def _load_weights(self, internal: str, path: Path, config: Any) -> None:
        from peft import PeftModelForCausalLM

        device = str(next(self._base.parameters()).device)
        created = self._peft is None
        try:
            if created:
                self._peft = PeftModelForCausalLM(self._base, config, adapter_name=internal)
                self._peft.eval()
            result = self._peft.load_adapter(path, adapter_name=internal, torch_device=device)
            missing = list(getattr(result, "missing_keys", []) or [])
            if missing:
                raise AdapterLoadError(
                    f"The adapter in {path} does not match this base model: {len(missing)} adapter weights "
                    f"are missing from its weights file (e.g. {missing[0]}). Was it trained for another "
                    f"model? Retrain or re-export it for this base model."
                )
        except Exception as exc:
            self._discard_failed(internal, created)
            if isinstance(exc, AdapterLoadError):
                raise
            raise AdapterLoadError(
                f"Could not load the adapter in {path}: {type(exc).__name__}: {_first_lines(exc)}. "
                f"Check that it is a complete PEFT LoRA adapter (saved with save_pretrained) trained for "
                f"this base model; the engine's adapters are unchanged."
            ) from exc

    def _discard_failed(self, internal: str, created: bool) -> None:
        if self._peft is None:
            return
        if created:  # the wrapper only existed for this adapter: take its layers out of the base model
            self._unwrap()
            return
        with contextlib.suppress(Exception), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._peft.delete_adapter(internal)

    # -- unloading ----------------------------------------------------------------------------------
    def unload(self, name: str) -> None:
        """Unload ``name``; the base model is unwrapped when it was the last adapter."""
        loaded = self._get(name)
        del self._loaded[name]
        self._delete(loaded.internal)

    def _delete(self, internal: str) -> None:
        if not self._loaded:
            self._unwrap()
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "adapter X was active which is now deleted"
            self._peft.delete_adapter(internal)

    def _unwrap(self) -> None:
        # PEFT cannot run with zero adapters; `unload` restores the base model's original layers in place.
        self._base = self._peft.unload()
        self._peft = None

    # -- running ------------------------------------------------------------------------------------
    def batch_group(self, name: str | None) -> str:
        """The running batch a row on ``name`` can share: ``"shared"`` for the base model and plain LoRA
        adapters (mixed-batch inference), else the adapter's own."""
        if name is None:
            return "shared"
        self.check(name)
        return "shared" if self._loaded[name].mixed_batch else f"adapter:{name}"

    def plan(self, adapters: list[str | None]) -> list[BatchPart]:
        """Split a batch whose row ``i`` uses ``adapters[i]`` (None = base) into parts to run.

        With only plain LoRA adapters the whole batch runs at once with PEFT's mixed-batch inference
        (``adapter_names``); otherwise each adapter's rows run separately with that adapter set.
        """
        for name in set(adapters):
            if name is not None:
                self.check(name)
        if self._peft is None:
            return [BatchPart(list(range(len(adapters))))]
        loaded = [self._loaded[a] if a is not None else None for a in adapters]
        if all(entry is None or entry.mixed_batch for entry in loaded):
            names = [entry.internal if entry is not None else BASE for entry in loaded]
            return [BatchPart(list(range(len(adapters))), {"adapter_names": names})]
        parts = []
        for choice in dict.fromkeys(adapters):
            rows = [i for i, a in enumerate(adapters) if a == choice]
            internal = self._loaded[choice].internal if choice is not None else None
            parts.append(BatchPart(rows, context=lambda internal=internal: self._only(internal)))
        return parts

    @contextlib.contextmanager
    def _only(self, internal: str | None) -> Iterator[None]:
        if internal is None:
            with self._peft.disable_adapter():
                yield
            return
        previous = self._peft.active_adapter
        self._peft.set_adapter(internal)
        try:
            yield
        finally:
            self._peft.set_adapter(previous)


def _read_config(path: Path) -> Any:
    from peft import PeftConfig

    if not path.is_dir():
        raise AdapterLoadError(
            f"Adapter directory {path} does not exist. Pass the directory a PEFT adapter was saved to "
            f"(with adapter_config.json and adapter_model.safetensors)."
        )
    if not (path / "adapter_config.json").is_file():
        raise AdapterLoadError(
            f"{path} has no adapter_config.json, so it is not a PEFT adapter directory. Save the adapter "
            f"with `model.save_pretrained(dir)` and pass that directory."
        )
    if not any((path / f).is_file() for f in _WEIGHT_FILES):
        raise AdapterLoadError(
            f"{path} has no adapter weights ({' or '.join(_WEIGHT_FILES)}). The save may be incomplete; "
            f"save the adapter again."
        )
    try:
        config = PeftConfig.from_pretrained(str(path))
    except Exception as exc:
        raise AdapterLoadError(
            f"Could not read {path / 'adapter_config.json'}: {type(exc).__name__}: {_first_lines(exc)}. "
            f"Re-save the adapter with save_pretrained."
        ) from exc
    config.inference_mode = True
    return config


def _is_plain_lora(config: Any) -> bool:
    from peft import LoraConfig

    return isinstance(config, LoraConfig) and not getattr(config, "use_dora", False)


def _first_lines(exc: BaseException, limit: int = 2, max_chars: int = 400) -> str:
    lines = str(exc).strip().splitlines()
    text = " ".join(line.strip() for line in lines[:limit])
    if len(text) > max_chars or len(lines) > limit:
        text = text[:max_chars].rstrip() + " ..."
    return text
