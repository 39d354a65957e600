"""benchmarks/sdft_front.py: resuming from its run log, and the markdown table beside the JSON."""

from dataclasses import asdict

from benchmarks.sdft_front import _aggregate, _logged_key, _markdown, _pareto, _run_key, _settings_for

DATA = {"data": "facts.jsonl", "retention": "retention.jsonl", "model": "m", "facts": 48, "retention_questions": 300}


def _record(variant: str, lr: float, seed: int, drop: tuple[str, ...] = ()) -> dict:
    settings = _settings_for(variant, lr, 10, seed, 1)
    logged = {k: v for k, v in asdict(settings).items() if k not in drop}
    return {"variant": variant, "method": "sft" if variant == "sft" else "sdft", "settings": logged, "data": DATA}


def test_a_run_logged_before_a_neutral_field_existed_still_counts_as_done() -> None:
    for variant, missing in (("sft", ("kl_anchor",)), ("rewrite", ("kl_anchor", "sft_warmup_epochs"))):
        expected = _run_key(variant, _settings_for(variant, 5e-4, 10, 0, 1), DATA)
        assert _logged_key(_record(variant, 5e-4, 0, drop=missing)) == expected


def test_logged_keys_still_tell_configurations_apart() -> None:
    keys = {_logged_key(_record(v, lr, s)) for v in ("sft", "rewrite") for lr in (5e-4, 1e-3) for s in (0, 1)}
    assert len(keys) == 8


def test_markdown_table_averages_seeds_and_lists_every_run() -> None:
    def run(variant: str, lr: float, seed: int, para: float, drop: float) -> dict:
        return {"variant": variant, "learning_rate": lr, "num_epochs": 10, "seed": seed, "direct_acc": 1.0,
                "paraphrase_acc": para, "retention_drop": drop, "kl_to_base": 1.0, "train_seconds": 100.0}

    runs = [run("sft", 1e-3, 0, 0.8, 0.06), run("sft", 1e-3, 1, 0.9, 0.04), run("rewrite", 1e-3, 0, 0.8, -0.04)]
    points = _aggregate(runs)
    fronts = {v: _pareto([p for p in points if p["variant"] == v]) for v in ("rewrite", "sft")}
    report = {"protocol": "reduced", "note": "", "runs": runs, "points": points, "fronts": fronts,
              "parameters": {"seeds_per_config": {"sft lr=0.001 x10": [0, 1], "rewrite lr=0.001 x10": [0]}},
              "base": {"direct_acc": 0.0, "paraphrase_acc": 0.0, "retention_acc": 0.36}}
    text = _markdown(report, "title")
    assert "| sft | 0.001 x 10 | 2 | 100.0% | 85.0% | +5.0 |" in text  # the seed mean
    assert "| sft | 0.001 x 10 | 1 | 100.0% | 90.0% | +4.0 |" in text  # one run
    assert "- **rewrite**: lr 0.001: 80.0% at -4.0 pts" in text
