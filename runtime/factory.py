"""Build the runtime's parts (engine, store) from a `RuntimeConfig`."""

from __future__ import annotations

from runtime.config import RuntimeConfig
from runtime.engines import Engine
from runtime.store import Store


def create_engine(config: RuntimeConfig) -> Engine:
    """The serving engine the config names (the embedded `TransformersEngine` by default)."""
    kind = config.engine.kind
    if kind == "transformers":
        from runtime.engines import TransformersEngine

        return TransformersEngine(
            config.model.name,
            device=config.engine.device,
            dtype=config.engine.dtype,
            num_threads=config.engine.num_threads,
            cache_dir=config.model.cache_dir,
        )
    raise NotImplementedError(
        f"engine.kind={kind!r} is not available in this version; use engine.kind: transformers"
    )


def open_store(config: RuntimeConfig, *, read_only: bool = False) -> Store:
    """Open (creating if needed) the DuckDB interaction log the config names."""
    return Store(
        config.store_path,
        queue_size=config.store.queue_size,
        batch_size=config.store.batch_size,
        flush_interval_s=config.store.flush_interval_s,
        read_only=read_only,
    )


def load_active_adapter(engine: Engine, store: Store, config: RuntimeConfig) -> str | None:
    """Load the registry's active adapter (if any) into `engine` as its default; returns its name."""
    from runtime.adapters import AdapterRegistry

    active = AdapterRegistry(config.adapters_dir, store).active()
    if active is None:
        return None
    if not engine.has_adapter(active.name):
        engine.load_adapter(active.name, active.path)
    engine.set_active_adapter(active.name)
    return active.name
