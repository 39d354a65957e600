"""Checks no policy lists: prompts with what their answer must satisfy, asked of a serving model greedily.

A probe file (format of ``../shared/data/general_probe_dev.jsonl``: ``{id, prompt, expect}`` rows) measures
collateral damage: every check passes on the base model, nothing trains or anchors on them, and a check that
fails after an update is behaviour the update broke. Shared by the gate suite (after each case's cycle) and
the forgetting benchmark (after each method's update).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from policies.checks import check_answer
from policies.schema import Expectation
from runtime.engines import ACTIVE, AdapterChoice, Engine, SamplingParams
from runtime.jsonl import read_jsonl

PROBE_TOKENS = 48  # as the probe file was made: every prompt passes on the base model at 48 greedy tokens


@dataclass
class Check:
    """A prompt with what its answer must satisfy."""

    name: str
    prompt: str
    expect: Expectation


def load_probe(path: Path) -> list[Check]:
    """Probe checks ``{id, prompt, expect}``; a malformed row stops the run, naming its line."""
    checks = []
    for n, row in read_jsonl(path):
        try:
            checks.append(Check(str(row.get("id", n)), row["prompt"], Expectation.model_validate(row["expect"])))
        except (KeyError, TypeError, ValueError) as exc:
            raise SystemExit(f"{path}:{n}: not a probe check ({exc})") from None
    return checks


def answers(
    engine: Engine, prompts: list[str], max_new_tokens: int, adapter: AdapterChoice = ACTIVE
) -> list[str]:
    """Greedy answers of `adapter` (default: the engine's active one, what users are served; ``None``: the base
    model), each prompt alone, as a user is served (in a padded batch a near-tie can come out differently)."""
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    return [engine.chat([[{"role": "user", "content": p}]], params, adapter=adapter)[0].text for p in prompts]


def failures(
    engine: Engine, checks: list[Check], max_new_tokens: int, markers: list[str], adapter: AdapterChoice = ACTIVE
) -> list[dict[str, str]]:
    """The checks the serving model (`adapter`, as :func:`answers`) fails, with its answers."""
    texts = answers(engine, [c.prompt for c in checks], max_new_tokens, adapter)
    return [
        {"name": c.name, "answer": t}
        for c, t in zip(checks, texts, strict=True)
        if not check_answer(c.expect, t, refusal_markers=markers).passed
    ]
