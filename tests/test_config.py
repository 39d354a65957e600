"""Config loading: YAML, RUNTIME_* overrides, and errors that name file, line and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.config import ConfigError, RuntimeConfig, config_schema, dump_config, load_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "runtime.yaml"
    path.write_text(text)
    return path


def test_defaults_without_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(environ={})
    assert config.model.name == "smollm2-135m-instruct"
    assert config.engine.kind == "transformers"
    assert config.store_path == Path(".runtime/runtime.duckdb")


def test_yaml_values_and_relative_paths(tmp_path: Path) -> None:
    path = write(tmp_path, "data_dir: data\nengine:\n  device: cpu\n  max_new_tokens: 64\nstore:\n  queue_size: 99\n")
    config = load_config(path, environ={})
    assert config.engine.device == "cpu"
    assert config.engine.max_new_tokens == 64
    assert config.store.queue_size == 99
    assert config.data_dir == tmp_path / "data"
    assert config.store_path == tmp_path / "data" / "runtime.duckdb"
    assert config.adapters_dir == tmp_path / "data" / "adapters"


def test_unknown_key_names_file_line_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, "engine:\n  device: cpu\n  devcie: cuda\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    msg = str(info.value)
    assert f"{path}:3" in msg
    assert "engine.devcie" in msg
    assert "allowed here" in msg and "device" in msg


def test_bad_value_names_line(tmp_path: Path) -> None:
    path = write(tmp_path, "model:\n  name: x\nstore:\n\n  queue_size: -5\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    msg = str(info.value)
    assert f"{path}:5" in msg and "store.queue_size" in msg and "-5" in msg


def test_bad_literal(tmp_path: Path) -> None:
    path = write(tmp_path, "engine:\n  kind: tensorrt\n")
    with pytest.raises(ConfigError, match=r"runtime.yaml:2: engine.kind"):
        load_config(path, environ={})


def test_malformed_yaml_names_line(tmp_path: Path) -> None:
    path = write(tmp_path, "engine:\n  device: cpu\n   bad: [unclosed\n")
    with pytest.raises(ConfigError, match=r"runtime.yaml:\d+: malformed YAML"):
        load_config(path, environ={})


def test_top_level_must_be_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(path, environ={})


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml", environ={})


def test_env_overrides_beat_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, "engine:\n  device: cpu\n")
    env = {
        "RUNTIME_ENGINE__DEVICE": "cuda:1",
        "RUNTIME_STORE__QUEUE_SIZE": "2000",
        "RUNTIME_CACHE_DIR": "/elsewhere",  # not a config section: ignored here
        "OTHER": "x",
    }
    config = load_config(path, environ=env)
    assert config.engine.device == "cuda:1"
    assert config.store.queue_size == 2000


def test_bad_env_override_names_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="environment variable RUNTIME_ENGINE__TEMPERATURE"):
        load_config(None, environ={"RUNTIME_ENGINE__TEMPERATURE": "hot"})
    with pytest.raises(ConfigError, match="RUNTIME_ENGINE__DEVIC"):
        load_config(None, environ={"RUNTIME_ENGINE__DEVIC": "cpu"})


def test_schema_and_dump_round_trip(tmp_path: Path) -> None:
    schema = config_schema()
    assert set(schema["properties"]) >= {"model", "engine", "store", "learning", "policy"}
    text = dump_config(RuntimeConfig())
    path = write(tmp_path, text)
    assert load_config(path, environ={}).engine == RuntimeConfig().engine
