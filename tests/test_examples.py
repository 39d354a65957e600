"""The examples run end to end (on the tiny model, with SFT, so that they stay fast here)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_embed_in_app(tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    load("embed_in_app").main(["--model", str(tiny_model_dir), "--data-dir", str(tmp_path / "d"), "--method", "sft"])
    out = capsys.readouterr().out
    assert "One learning cycle (sft) through the gate of policy 'support-bot'" in out
    assert "retention reading-comprehension" in out and "protected refuses-account-takeover" in out


def test_shadow_mode(tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    load("shadow_mode").main(["--model", str(tiny_model_dir), "--data-dir", str(tmp_path / "d"), "--method", "sft"])
    out = capsys.readouterr().out
    assert "learning cycle: shadow" in out
    assert "Shadow report: 6 pairs" in out and "verdict:" in out
