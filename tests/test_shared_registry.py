"""The adapter registry on shared storage (an fsspec URL): publishing, and verified fetching on the reader's side.

``memory://`` is fsspec's in-process filesystem (the same code path as ``s3://``, without a network); the cycle
test uses a ``file://`` URL because the worker is another process.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import fsspec
import pytest

from learners.worker import TrainJob, localize_inputs
from orchestration.cycle import run_cycle
from runtime.adapters import AdapterRegistry, AdapterVerificationError, Lineage, adapter_checksum, fetch_adapter
from runtime.config import RuntimeConfig, load_config
from runtime.store import Store
from tests.tiny_model import make_lora_adapter


@pytest.fixture
def store(tmp_path: Path):
    s = Store(tmp_path / "runtime.duckdb")
    yield s
    s.close()


@pytest.fixture
def url() -> str:
    return f"memory://registry-{uuid.uuid4().hex[:8]}/adapters"


def publish(registry: AdapterRegistry, model_dir: Path, name: str, seed: int = 1, parent: str | None = None):
    staged = registry.staging_dir(f"run-{name}")
    make_lora_adapter(model_dir, staged / "adapter", seed=seed)
    return registry.publish(staged / "adapter", name, Lineage(parent, "sft", f"run-{name}", {"new": 1}, {}))


def test_publish_to_a_url_and_load_a_verified_copy(
    tmp_path: Path, store: Store, url: str, tiny_model_dir: Path, tiny_engine
) -> None:
    registry = AdapterRegistry(url, store, cache_dir=tmp_path / "cache")
    record = publish(registry, tiny_model_dir, "a1")
    assert record.path == f"{url}/a1" and record.status == "candidate"
    fs = fsspec.filesystem("memory")
    remote = {p.rsplit("/", 1)[-1] for p in fs.find(record.path.removeprefix("memory://"))}
    assert {"adapter_config.json", "adapter_model.safetensors", "lineage.json"} <= remote
    lineage = json.loads(fs.cat_file(f"{record.path}/lineage.json"))
    assert lineage["checksum"] == record.checksum
    assert not (registry.staging_root / "run-a1" / "adapter").exists()  # the local staged copy is gone

    local = fetch_adapter(record.path, record.checksum, tmp_path / "replica-cache")
    assert local.is_relative_to(tmp_path / "replica-cache") and adapter_checksum(local) == record.checksum
    assert fetch_adapter(record.path, record.checksum, tmp_path / "replica-cache") == local  # cached

    registry.activate("a1")  # activation verifies the shared copy
    registry.load_into(tiny_engine, store.get_adapter("a1"))
    try:
        assert tiny_engine.has_adapter("a1")
    finally:
        tiny_engine.unload_adapter("a1")
    with pytest.raises(FileExistsError):
        publish(registry, tiny_model_dir, "a1", seed=2)


def test_a_changed_adapter_on_shared_storage_is_never_loaded(
    tmp_path: Path, store: Store, url: str, tiny_model_dir: Path, tiny_engine
) -> None:
    registry = AdapterRegistry(url, store, cache_dir=tmp_path / "cache")
    record = publish(registry, tiny_model_dir, "a1")
    fs = fsspec.filesystem("memory")
    fs.pipe_file(f"{record.path}/adapter_config.json", b'{"tampered": true}')
    cache = tmp_path / "replica-cache"
    with pytest.raises(AdapterVerificationError, match="do not match the registry checksum"):
        fetch_adapter(record.path, record.checksum, cache)
    assert not cache.exists() or not any(cache.iterdir())  # nothing kept
    with pytest.raises(AdapterVerificationError):
        registry.load_into(tiny_engine, record)
    assert not tiny_engine.has_adapter("a1")
    with pytest.raises(AdapterVerificationError):
        registry.activate("a1")


def test_an_incomplete_or_missing_adapter_is_refused(tmp_path: Path, store: Store, url: str,
                                                      tiny_model_dir: Path) -> None:
    registry = AdapterRegistry(url, store, cache_dir=tmp_path / "cache")
    record = publish(registry, tiny_model_dir, "a1")
    fs = fsspec.filesystem("memory")
    fs.rm(f"{record.path}/lineage.json")  # what a reader sees while a publish is still uploading
    with pytest.raises(AdapterVerificationError, match="incomplete"):
        fetch_adapter(record.path, record.checksum, tmp_path / "c")
    with pytest.raises(AdapterVerificationError, match="incomplete"):
        fetch_adapter(f"{url}/never-published", None, tmp_path / "c")


def test_a_damaged_cached_copy_is_fetched_again(tmp_path: Path, store: Store, url: str, tiny_model_dir: Path) -> None:
    registry = AdapterRegistry(url, store, cache_dir=tmp_path / "cache")
    record = publish(registry, tiny_model_dir, "a1")
    local = fetch_adapter(record.path, record.checksum, tmp_path / "c")
    (local / "adapter_config.json").write_text("{}")
    again = fetch_adapter(record.path, record.checksum, tmp_path / "c")
    assert adapter_checksum(again) == record.checksum


def test_a_local_adapter_is_verified_in_place(tmp_path: Path, store: Store, tiny_model_dir: Path) -> None:
    registry = AdapterRegistry(tmp_path / "adapters", store)
    record = publish(registry, tiny_model_dir, "a1")
    assert record.path == str(tmp_path / "adapters" / "a1")
    assert fetch_adapter(record.path, record.checksum, tmp_path / "c") == Path(record.path)
    assert fetch_adapter(record.path, None, tmp_path / "c") == Path(record.path)  # lineage.json's checksum
    with pytest.raises(AdapterVerificationError, match="do not match"):
        fetch_adapter(record.path, "0" * 64, tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_a_job_reads_a_url_parent_through_a_verified_copy(
    tmp_path: Path, store: Store, url: str, tiny_model_dir: Path
) -> None:
    registry = AdapterRegistry(url, store, cache_dir=tmp_path / "cache")
    parent = publish(registry, tiny_model_dir, "p")
    job = TrainJob("sft", str(tiny_model_dir), [], str(tmp_path / "out"), parent_adapter_dir=parent.path,
                   parent_adapter_checksum=parent.checksum)
    localize_inputs(job, tmp_path / "node-cache")
    assert Path(job.parent_adapter_dir).is_relative_to(tmp_path / "node-cache")
    assert adapter_checksum(job.parent_adapter_dir) == parent.checksum

    bad = TrainJob("sft", str(tiny_model_dir), [], str(tmp_path / "out"), parent_adapter_dir=parent.path,
                   parent_adapter_checksum="f" * 64)
    with pytest.raises(AdapterVerificationError):
        localize_inputs(bad, tmp_path / "node-cache-2")


def test_config_keeps_a_url_and_resolves_a_relative_path(tmp_path: Path) -> None:
    (tmp_path / "url.yaml").write_text("learning:\n  adapters_dir: s3://bucket/adapters\n")
    assert load_config(tmp_path / "url.yaml", environ={}).adapters_dir == "s3://bucket/adapters"
    (tmp_path / "rel.yaml").write_text("learning:\n  adapters_dir: shared/adapters\n")
    assert load_config(tmp_path / "rel.yaml", environ={}).adapters_dir == tmp_path / "shared" / "adapters"


def test_learning_cycles_publish_to_and_continue_from_a_file_url_registry(
    tmp_path: Path, store: Store, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RUNTIME_CACHE_DIR", str(tmp_path / "cache"))  # the registry's and the worker's copies
    shared = tmp_path / "shared" / "adapters"
    config = RuntimeConfig.model_validate({
        "data_dir": str(tmp_path / "data"), "model": {"name": str(tiny_model_dir)},
        "engine": {"device": "cpu", "num_threads": 1},
        "learning": {"adapters_dir": shared.as_uri(), "lora": {"r": 4, "alpha": 8}, "anchors": {"enabled": False},
                     "sft": {"num_epochs": 1, "learning_rate": 1e-2}},
    })
    for round_ in range(2):
        store.add_signal("demonstration", text=f"answer {round_}",
                         messages=[{"role": "user", "content": f"q{round_}"}])
        result = run_cycle(config, store, "sft", num_threads=1)
        assert result.status == "activated", result.message
        assert result.adapter.path == f"{shared.as_uri()}/{result.adapter.name}"
        assert adapter_checksum(shared / result.adapter.name) == result.adapter.checksum
    assert result.adapter.parent is not None  # the second trained from the first, read back from the URL
    assert sorted(p.name for p in shared.iterdir()) == sorted(a.name for a in store.adapters())
    assert any((tmp_path / "cache" / "fetched" / "adapters").iterdir())  # the worker read the parent from a copy
