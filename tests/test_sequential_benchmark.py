"""benchmarks/sequential.py runs end to end in a tiny configuration (tiny model, two batches)."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.sequential import main


def test_sequential_benchmark_tiny(tmp_path: Path, tiny_model_dir: Path) -> None:
    facts = tmp_path / "facts.jsonl"
    facts.write_text(
        "".join(
            json.dumps(
                {"id": f"f{i}", "demonstration": f"Fact {i} is true.", "question": f"Fact {i}?", "answer": f"{i}",
                 "paraphrases": [f"Is fact {i} so?"]}
            )
            + "\n"
            for i in range(4)
        )
    )
    retention = tmp_path / "ret.jsonl"
    retention.write_text(
        "".join(
            json.dumps({"context": f"Passage {i}.", "questions": [{"question": f"q{i}", "answer": f"a{i}"}]}) + "\n"
            for i in range(4)
        )
    )
    out = tmp_path / "sequential.json"
    result = main(
        [
            "--data", str(facts), "--retention", str(retention), "--model", str(tiny_model_dir),
            "--methods", "sft,auto", "--batches", "2", "--batch-size", "2", "--retention-questions", "2",
            "--auto-retention-questions", "2", "--sft-set", "num_epochs=1", "--lora-set", "r=4",
            "--auto-candidates", "[{method: sft, num_epochs: 1}]", "--anchors-set", "count=2", "--out", str(out),
        ]
    )
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    sft_steps = saved["methods"]["sft"]["steps"]
    assert [s["step"] for s in sft_steps] == [1, 2]
    assert all(s["status"] == "activated" for s in sft_steps)
    assert len(sft_steps[1]["batches"]) == 2  # every earlier batch is measured again
    assert "retention_drop" in sft_steps[1]
    assert set(saved["methods"]) == {"sft", "auto"}
    assert saved["config"]["anchors_overrides"] == {"count": 2}
    assert saved["config"]["overrides"]["sft"] == {"num_epochs": 1}  # how the run was made, e.g. its seed
    assert saved["config"]["overrides"]["lora"] == {"r": 4}
    assert out.with_suffix(".md").read_text().startswith("| method |")
