"""benchmarks/sdft_front.py resumes from its run log across settings fields added after a run was logged."""

from dataclasses import asdict

from benchmarks.sdft_front import _logged_key, _run_key, _settings_for

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
