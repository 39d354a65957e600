"""What serves is what was published: checksums verified on every load, a clear refusal and a fallback."""

from __future__ import annotations

import stat
from pathlib import Path

import httpx
import pytest

from orchestration.service import RuntimeService
from runtime.adapters import ADAPTER_FILE_MODE, AdapterRegistry, AdapterVerificationError, Lineage
from runtime.config import RuntimeConfig
from runtime.store import Store
from tests.tiny_model import make_lora_adapter


def _config(tmp_path: Path, model_dir: Path) -> RuntimeConfig:
    return RuntimeConfig.model_validate(
        {"data_dir": str(tmp_path / "data"), "model": {"name": str(model_dir)}, "engine": {"device": "cpu"}}
    )


def _publish_chain(config: RuntimeConfig, model_dir: Path, n: int) -> list[str]:
    """`n` adapters, each the child of the one before, the last one active."""
    with Store(config.store_path) as store:
        registry = AdapterRegistry(config.adapters_dir, store)
        parent, names = None, []
        for i in range(n):
            staged = registry.staging_dir(f"run-{i}")
            make_lora_adapter(model_dir, staged, seed=i)
            record = registry.publish(staged, f"a{i}", Lineage(parent, "sft", f"run-{i}", {}, {}))
            registry.activate(record.name)
            parent = record.name
            names.append(record.name)
    return names


def _flip_a_byte(adapter_dir: Path) -> None:
    weights = adapter_dir / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))


def test_published_files_are_group_readable_and_no_one_elses(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = _config(tmp_path, tiny_model_dir)
    (name,) = _publish_chain(config, tiny_model_dir, 1)
    adapter_dir = config.adapters_dir / name
    assert stat.S_IMODE(adapter_dir.stat().st_mode) == 0o750
    for item in adapter_dir.iterdir():
        assert stat.S_IMODE(item.stat().st_mode) == ADAPTER_FILE_MODE == 0o640


def test_a_tampered_active_adapter_is_refused_at_start_up_and_its_parent_serves(
    tmp_path: Path, tiny_model_dir: Path, tiny_engine
) -> None:
    config = _config(tmp_path, tiny_model_dir)
    parent, child = _publish_chain(config, tiny_model_dir, 2)
    _flip_a_byte(config.adapters_dir / child)
    with Store(config.store_path) as store, RuntimeService(config, tiny_engine, store) as service:
        try:
            service.sync_engine()
            assert tiny_engine.active_adapter == parent and not tiny_engine.has_adapter(child)
            assert len(service.integrity_failures) == 1 and "checksum" in service.integrity_failures[0]
            assert store.get_adapter(child).status == "rolled_back" and store.get_adapter(parent).status == "active"
            rollback = store.decisions(adapter=child)[0]
            assert rollback.decision == "rollback" and "refused at start-up" in rollback.reasons[0]
            assert rollback.checks == {"restored": parent}
            with pytest.raises(AdapterVerificationError):
                service.promote(child, force=True)  # promotion verifies too
            assert not tiny_engine.has_adapter(child)
        finally:
            for name in tiny_engine.list_adapters():
                tiny_engine.unload_adapter(name)
            tiny_engine.set_active_adapter(None)


def test_with_no_good_ancestor_the_base_model_serves(tmp_path: Path, tiny_model_dir: Path, tiny_engine) -> None:
    config = _config(tmp_path, tiny_model_dir)
    (only,) = _publish_chain(config, tiny_model_dir, 1)
    _flip_a_byte(config.adapters_dir / only)
    with Store(config.store_path) as store, RuntimeService(config, tiny_engine, store) as service:
        service.sync_engine()
        assert tiny_engine.active_adapter is None and service.registry.active() is None
        assert store.decisions(adapter=only)[0].checks == {"restored": None}


def test_a_tampered_adapter_asked_for_by_name_is_a_409_and_counted(tmp_path: Path, tiny_model_dir: Path) -> None:
    from server import create_app
    from tests.test_server import serve_in_thread

    config = _config(tmp_path, tiny_model_dir)
    with Store(config.store_path) as store:
        registry = AdapterRegistry(config.adapters_dir, store)
        staged = registry.staging_dir("run-x")
        make_lora_adapter(tiny_model_dir, staged, seed=3)
        registry.publish(staged, "candidate-x", Lineage(None, "sft", "run-x", {}, {}))
    _flip_a_byte(config.adapters_dir / "candidate-x")
    app = create_app(config, admin_token="t", background_learning=False)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        answer = http.post("/v1/chat/completions", json={
            "model": "candidate-x", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
        })
        assert answer.status_code == 409, answer.text
        error = answer.json()["error"]
        assert error["code"] == "adapter_refused" and "checksum" in error["message"]
        assert "runtime_adapters_refused_total 1.0" in http.get("/metrics").text
        assert http.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).status_code == 200
