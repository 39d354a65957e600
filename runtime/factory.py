"""Build the runtime's parts (engine, store) from a `RuntimeConfig`."""

from __future__ import annotations

from runtime.config import RuntimeConfig
from runtime.cpu import serving_cpu_threads
from runtime.engines import Engine
from runtime.store import Store


def create_engine(config: RuntimeConfig) -> Engine:
    """The serving engine the config names (the embedded `TransformersEngine` by default; a `ReplicaSet` when
    ``engine.replicas`` lists serving replicas)."""
    if config.engine.replicas:
        return _replica_set(config)
    kind = config.engine.kind
    if kind == "transformers":
        from runtime.engines import TransformersEngine

        return TransformersEngine(
            config.model.name,
            device=config.engine.device,
            dtype=config.engine.dtype,
            num_threads=config.engine.num_threads or serving_cpu_threads(),
            cache_dir=config.model.cache_dir,
            max_batch_size=config.engine.max_batch_size,
            max_queued_requests=config.engine.max_queued_requests,
        )
    if kind in ("vllm", "sglang"):
        import os

        from runtime.config import ConfigError
        from runtime.engines import SGLangEngine, VLLMEngine

        if not config.engine.base_url:
            port = 8000 if kind == "vllm" else 30000
            raise ConfigError(
                f"engine.kind: {kind} needs engine.base_url, the running server's address (e.g. "
                f"http://localhost:{port}): set it in runtime.yaml or with RUNTIME_ENGINE__BASE_URL."
            )
        engine_class = VLLMEngine if kind == "vllm" else SGLangEngine
        # The served model is discovered from the server; an API key (server started with --api-key) comes
        # from the environment so that it stays out of runtime.yaml.
        return engine_class(config.engine.base_url, api_key=os.environ.get("RUNTIME_ENGINE_API_KEY"))
    raise NotImplementedError(
        f"engine.kind={kind!r} is not available in this version; use transformers, vllm or sglang"
    )


def _replica_set(config: RuntimeConfig) -> Engine:
    import os

    from runtime.adapters import adapter_checksum, recorded_checksum
    from runtime.config import ConfigError
    from runtime.engines import ReplicaEndpoint, ReplicaSet

    if config.engine.base_url:
        raise ConfigError(
            "engine.replicas and engine.base_url are both set: list every server under engine.replicas and remove "
            "engine.base_url."
        )

    def checksum_of(location: str) -> str | None:
        # The registry's checksum (written at publishing) when the directory has one, else the files' own.
        if "://" in location:
            return None
        return recorded_checksum(location) or adapter_checksum(location)

    env_key = os.environ.get("RUNTIME_ENGINE_API_KEY")
    endpoints = [ReplicaEndpoint(r.kind, r.base_url, r.api_key or env_key) for r in config.engine.replicas]
    return ReplicaSet(endpoints, checksum_of=checksum_of, probe_interval_s=config.engine.replica_probe_interval_s,
                      timeout=config.engine.request_timeout_s, follow=config.engine.follow_replicas)


def open_store(config: RuntimeConfig, *, read_only: bool = False) -> Store:
    """Open (creating if needed) the DuckDB interaction log the config names."""
    return Store(
        config.store_path,
        queue_size=config.store.queue_size,
        batch_size=config.store.batch_size,
        flush_interval_s=config.store.flush_interval_s,
        read_only=read_only,
        ship_to=config.store.ship_to,
        import_from=config.store.import_from,
        writer_id=config.store.writer_id,
        ship_interval_s=config.store.ship_interval_s,
    )
