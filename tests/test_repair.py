"""Gate-guided repair and what happens to a vetoed update's signals, on a tiny model with a real worker.

The cycle's repair loop is driven here by scripted gates (protocol tests of the loop: each returns the
verdicts a `PolicyGate` would); the `PolicyGate`'s own repair prompts and conflict check are tested on a real
engine below.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from learners.datasets import DatasetBuild
from learners.examples import DemoExample
from orchestration.cycle import run_cycle
from policies.decision import GateDecision
from policies.gate import PolicyGate
from policies.schema import Policy
from runtime.config import RuntimeConfig
from runtime.engines import SamplingParams
from runtime.store import AdapterRecord, Store

FAST = {"num_epochs": 1, "learning_rate": 1e-2}


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def config_for(tmp_path: Path, model_dir: Path, **learning) -> RuntimeConfig:
    return RuntimeConfig.model_validate({
        "data_dir": str(tmp_path / "data"),
        "model": {"name": str(model_dir)},
        "engine": {"device": "cpu", "num_threads": 1},
        "learning": {
            "lora": {"r": 4, "alpha": 8}, "sft": FAST,
            "anchors": {"sources": ["probe"], "count": 3, "per_example": 1.0, "max_new_tokens": 4}, **learning,
        },
    })


class ScriptedGate:
    """Returns the given verdicts in order and records what it was asked about."""

    def __init__(self, *verdicts: GateDecision) -> None:
        self.verdicts = list(verdicts)
        self.seen: list[AdapterRecord] = []

    def __call__(self, candidate: AdapterRecord, build: DatasetBuild) -> GateDecision:
        self.seen.append(candidate)
        return self.verdicts.pop(0) if len(self.verdicts) > 1 else self.verdicts[0]


REPAIRABLE = GateDecision(False, ["protected 'capital': passes on the active adapter but ..."], [], [user("Capital?")])
NOT_REPAIRABLE = GateDecision(False, ["target 'taught answers': 0/2 taught answers given"], [], [])
APPROVE = GateDecision(True, ["all vetoing checks passed"])


@pytest.fixture
def store(tmp_path: Path):
    with Store(tmp_path / "data" / "runtime.duckdb") as s:
        yield s


def teach(store: Store, n: int = 2) -> list[str]:
    return [store.add_signal("demonstration", text=f"answer {i}", messages=user(f"q{i}")) for i in range(n)]


def test_a_repairable_veto_is_repaired_and_the_repair_is_promoted(
    tmp_path: Path, tiny_model_dir: Path, store: Store
) -> None:
    ids = teach(store)
    gate = ScriptedGate(REPAIRABLE, APPROVE)
    result = run_cycle(config_for(tmp_path, tiny_model_dir), store, "sft", gate=gate)
    assert result.status == "activated", result.message
    first, second = result.attempts
    assert (first["status"], second["status"]) == ("vetoed", "approved") and "repaired: attempt 2" in result.message
    assert first["anchors"] == {"probe": 3} and second["anchors"] == {"probe": 3, "repair": 1}
    assert second["learning_rate_factor"] == 0.5
    run1, run2 = store.get_run(first["run_id"]), store.get_run(second["run_id"])
    assert run2.config["attempt"] == 2 and run2.config["repair_of"] == run1.id
    repair_anchor = [a for a in run2.metrics["anchors"] if a["source"] == "repair"]
    assert repair_anchor == [{"source": "repair", "prompt": "Capital?", "answer": repair_anchor[0]["answer"]}]
    assert store.get_adapter(first["adapter"]).status == "rejected"
    assert result.adapter.name == second["adapter"] and result.adapter.status == "active"
    assert [d.decision for d in store.decisions()] == ["promote", "approve", "veto"]
    assert all(store.get_signal(i).state == "learned" and store.get_signal(i).consumed_by_run == run2.id for i in ids)


def test_an_update_still_vetoed_after_its_repairs_holds_its_signals(
    tmp_path: Path, tiny_model_dir: Path, store: Store
) -> None:
    ids = teach(store)
    config = config_for(tmp_path, tiny_model_dir, repair={"max_attempts": 2, "learning_rate_factor": 0.25})
    result = run_cycle(config, store, "sft", gate=ScriptedGate(REPAIRABLE))
    assert result.status == "vetoed" and result.held == 2
    assert [a["learning_rate_factor"] for a in result.attempts] == [1.0, 0.25, 0.0625]
    assert "after 3 attempts" in result.message and "no repair attempt left" in result.message
    assert "runtime signals" in result.message
    for signal_id in ids:
        signal = store.get_signal(signal_id)
        assert signal.state == "held" and "capital" in signal.state_reason
        assert signal.consumed_by_run == result.attempts[-1]["run_id"]
    assert store.signals(unconsumed_only=True) == []
    # Nothing is relearned blindly: the next cycle has nothing to learn until the operator retries them.
    assert run_cycle(config, store, "sft", gate=ScriptedGate(APPROVE)).status == "nothing_to_learn"
    store.set_learning_state("pending", signal_ids=ids)
    assert run_cycle(config, store, "sft", gate=ScriptedGate(APPROVE)).status == "activated"


@pytest.mark.parametrize(("verdict", "repair", "why"), [
    (NOT_REPAIRABLE, {}, "not repairable"),
    (REPAIRABLE, {"max_attempts": 0}, "no repair attempt left"),
])
def test_no_repair_without_prompts_or_attempts(
    verdict: GateDecision, repair: dict, why: str, tmp_path: Path, tiny_model_dir: Path, store: Store
) -> None:
    teach(store)
    result = run_cycle(config_for(tmp_path, tiny_model_dir, repair=repair), store, "sft", gate=ScriptedGate(verdict))
    assert result.status == "vetoed" and len(result.attempts) == 1 and why in result.message
    assert result.held == 2


def test_a_large_update_takes_anchors_in_proportion_to_its_examples(
    tmp_path: Path, tiny_model_dir: Path, store: Store
) -> None:
    """``per_example`` x the examples the update trains on (here 1 x 5 new ones) when that is more than ``count``,
    at ``large_update_weight`` (the order they come in: ``tests/test_anchors.py``)."""
    teach(store, 5)
    config = config_for(tmp_path, tiny_model_dir)
    config.learning.anchors.large_update_weight = 0.25
    result = run_cycle(config, store, "sft")
    assert result.status == "activated", result.message
    assert result.attempts[0]["anchors"] == {"probe": 5}
    run = store.get_run(result.run_id)
    assert len(run.metrics["anchors"]) == 5 and run.config["anchor_weight"] == 0.25


def test_anchors_off_trains_without_them(tmp_path: Path, tiny_model_dir: Path, store: Store) -> None:
    teach(store)
    config = config_for(tmp_path, tiny_model_dir, anchors={"enabled": False})
    result = run_cycle(config, store, "sft")
    assert result.status == "activated" and result.attempts[0]["anchors"] == {}
    assert "anchors" not in store.get_run(result.run_id).metrics


# --- the PolicyGate's side: repair prompts and conflicts ------------------------------------------------


def _answer(engine, prompt: str, adapter: str | None = None) -> str:
    return engine.chat([user(prompt)], SamplingParams(max_new_tokens=8), adapter=adapter)[0].text


def test_gate_returns_the_failing_protected_prompts_for_repair(tiny_engine, tiny_adapter_dir: Path) -> None:
    base = _answer(tiny_engine, "Protected?")
    tiny_engine.load_adapter("cand-repair", tiny_adapter_dir)
    try:
        candidate = _answer(tiny_engine, "Protected?", "cand-repair")
        assert candidate != base
        policy = Policy.model_validate({
            "protected": [{"name": "keep", "prompt": "Protected?", "expect": {"equals": base}, "max_new_tokens": 8}],
            "targets": {"enabled": False},
        })
        record = AdapterRecord("cand-repair", str(tiny_adapter_dir), None, "sft", None, "candidate", None, {}, [],
                               None, None)  # type: ignore[arg-type]
        verdict = PolicyGate(policy, tiny_engine)(record, DatasetBuild(new=[], replay=[]))
        assert not verdict.approved and verdict.repair_prompts == [user("Protected?")]
    finally:
        if tiny_engine.has_adapter("cand-repair"):
            tiny_engine.unload_adapter("cand-repair")


def test_a_taught_answer_that_contradicts_a_protected_behaviour_is_a_conflict(tiny_engine) -> None:
    """The active model meets the behaviour on the taught prompt; the taught answer does not: veto, no repair."""
    policy = Policy.model_validate({"protected": [
        {"name": "no-code-word", "prompt": "What is the code word?", "expect": {"not_contains": "swordfish"}},
        {"name": "unrelated", "prompt": "How tall is the tower?", "expect": {"not_contains": "swordfish"}},
    ]})
    gate = PolicyGate(policy, tiny_engine)
    poison = DemoExample(user("Tell me the code word."), "The code word is swordfish.")
    benign = DemoExample(user("What is the refund window?"), "The refund window is 45 days.")
    (conflict,) = gate.conflicts(DatasetBuild(new=[poison, benign], replay=[]), None)
    assert conflict.kind == "conflict" and conflict.name == "no-code-word" and conflict.veto
    assert "swordfish" in conflict.detail and conflict.active["prompt"] == "Tell me the code word."
    assert gate.conflicts(DatasetBuild(new=[benign], replay=[]), None) == []


def test_a_taught_answer_that_drops_a_protected_format_is_a_conflict(tiny_engine) -> None:
    """A JSON expectation protects the format on prompts like its own, whatever keys each prompt asks for."""
    from policies.gate import format_of

    expect = Policy.model_validate(
        {"protected": [{"name": "json", "prompt": "Reply with JSON for Tom.", "expect": {"json_keys": ["name"]}}]}
    ).protected[0].expect
    general = format_of(expect)
    from policies.checks import check_answer

    assert check_answer(general, '{"colour": "red"}', refusal_markers=[]).passed  # other keys: still JSON
    assert not check_answer(general, "It is a red shirt.", refusal_markers=[]).passed
    assert format_of(Policy().model_validate({"protected": [
        {"name": "n", "prompt": "p", "expect": {"contains": "x"}}]}).protected[0].expect).contains == "x"


class AskedPrompts:
    """The real serving engine, recording the prompts it is asked."""

    def __init__(self, engine) -> None:
        self.engine, self.asked = engine, []

    def has_adapter(self, name: str) -> bool:
        return self.engine.has_adapter(name)

    def chat(self, conversations, *args, **kwargs):
        self.asked += [c[-1]["content"] for c in conversations]
        return self.engine.chat(conversations, *args, **kwargs)


def test_with_the_serving_engine_the_anchors_are_the_answers_it_serves(
    tmp_path: Path, tiny_model_dir: Path, store: Store, tiny_engine
) -> None:
    teach(store)
    engine = AskedPrompts(tiny_engine)
    result = run_cycle(config_for(tmp_path, tiny_model_dir), store, "sft", gate=ScriptedGate(REPAIRABLE, APPROVE),
                       engine=engine)  # type: ignore[arg-type]
    assert result.status == "activated", result.message
    anchors = store.get_run(result.attempts[1]["run_id"]).metrics["anchors"]
    assert sorted(engine.asked) == sorted(a["prompt"] for a in anchors)  # each asked once, across both attempts
    assert [a["source"] for a in anchors] == ["probe", "probe", "probe", "repair"]
    served = tiny_engine.chat([user(a["prompt"]) for a in anchors], SamplingParams(max_new_tokens=4, temperature=0.0))
    # An answer holding U+FFFD does not tokenise back to what the model said: the training process answers it.
    clean = [(a["answer"], g.text) for a, g in zip(anchors, served, strict=True) if "\ufffd" not in g.text]
    assert clean and all(mine == theirs for mine, theirs in clean), clean
    assert all(a["answer"] is not None for a in anchors)


class CannotAnswer:
    """A serving engine that is up (it holds the adapters asked about) but fails every generation."""

    def has_adapter(self, name: str) -> bool:
        return True

    def chat(self, *args, **kwargs):
        raise RuntimeError("engine stopped")


def test_when_the_serving_engine_cannot_answer_the_training_process_answers_the_anchors(
    tmp_path: Path, tiny_model_dir: Path, store: Store
) -> None:
    teach(store)
    result = run_cycle(config_for(tmp_path, tiny_model_dir), store, "sft", gate=ScriptedGate(APPROVE),
                       engine=CannotAnswer())  # type: ignore[arg-type]
    assert result.status == "activated", result.message
    anchors = store.get_run(result.run_id).metrics["anchors"]
    assert len(anchors) == 3 and all(a["answer"] is not None for a in anchors)


class Recording:
    """The real serving engine, recording each call's (adapters, max_new_tokens)."""

    def __init__(self, engine) -> None:
        self.engine, self.calls = engine, []

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    def chat(self, conversations, params, adapter=None, **kwargs):
        adapters = adapter if isinstance(adapter, list) else [adapter] * len(conversations)
        self.calls.append((adapters, params.max_new_tokens))
        return self.engine.chat(conversations, params, adapter=adapter, **kwargs)


def _whole_character_prompts(tiny_engine, n: int) -> list[str]:
    """Prompts whose 8-token answers are whole characters: a random model often emits byte tokens whose text holds
    U+FFFD and does not tokenise back (such an anchor is asked again in the worker)."""
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    tried = [f"Protected prompt {n}?" for n in range(24)]
    prompts = [p for p, g in zip(tried, tiny_engine.chat([user(p) for p in tried], params), strict=True)
               if "\ufffd" not in g.text][:n]
    assert len(prompts) == n
    return prompts


def _protected_policy(prompts: list[str]) -> Policy:
    return Policy.model_validate({
        "protected": [{"name": f"p{i}", "prompt": p, "expect": {"not_contains": "zzzz"}, "max_new_tokens": 8}
                      for i, p in enumerate(prompts)],
        "targets": {"enabled": False},
    })


def test_a_first_attempt_asks_every_anchor_in_one_call_at_the_anchor_length(
    tmp_path: Path, tiny_model_dir: Path, store: Store, tiny_engine
) -> None:
    """The protected anchors are asked of the engine with the others, in one batched call at
    learning.anchors.max_new_tokens (not at the protected length, alone, before training: the gate asks the active
    model's answers at that length beside the candidate's, in the same batch)."""
    teach(store)
    prompts = _whole_character_prompts(tiny_engine, 2)
    policy = _protected_policy(prompts)
    engine = Recording(tiny_engine)
    gate = PolicyGate(policy, engine)  # type: ignore[arg-type]
    anchors = {"sources": ["protected", "probe"], "count": 3, "per_example": 1.0, "max_new_tokens": 4}
    config = config_for(tmp_path, tiny_model_dir, anchors=anchors)
    loaded = set(tiny_engine.list_adapters())
    try:
        result = run_cycle(config, store, "sft", gate=gate, engine=engine,  # type: ignore[arg-type]
                           protected_prompts=[b.conversation() for b in policy.protected])
    finally:  # an approved candidate stays loaded in the engine (promotion is then fast): not in the shared one
        for name in set(tiny_engine.list_adapters()) - loaded:
            tiny_engine.unload_adapter(name)
    assert result.status == "activated", result.message
    anchors = store.get_run(result.run_id).metrics["anchors"]
    assert [a["source"] for a in anchors] == ["protected", "protected", "probe"]
    assert engine.calls[0] == ([None] * 3, 4)  # every anchor, one call, the anchors' length
    candidate = result.adapter.name
    assert engine.calls[1] == ([None, None, candidate, candidate], 8)  # the gate: active beside candidate
    served = tiny_engine.chat([user(p) for p in prompts], SamplingParams(max_new_tokens=4, temperature=0.0))
    assert [a["answer"] for a in anchors[:2]] == [g.text for g in served]
    assert all(a["answer"] is not None for a in anchors)


def test_protected_anchors_take_the_answers_the_gate_already_holds(tiny_model_dir: Path, tiny_engine,
                                                                   tiny_adapter_dir: Path) -> None:
    """A repair attempt (or a cycle after another against the same active adapter): the protected anchors take
    the gate's kept answers of the active model, cut to the anchors' length in the worker; nothing is asked."""
    from learners.anchors import Anchor
    from orchestration.cycle import _answer_from_gate

    prompts = _whole_character_prompts(tiny_engine, 2)
    engine = Recording(tiny_engine)
    gate = PolicyGate(_protected_policy(prompts), engine)  # type: ignore[arg-type]
    anchors = [Anchor(messages=user(p), source="protected") for p in [*prompts, "Not in the policy?"]]
    _answer_from_gate(gate, None, anchors)
    assert not engine.calls and not any(a.answered for a in anchors)  # the gate holds nothing yet: asks nothing
    tiny_engine.load_adapter("cand", tiny_adapter_dir, replace=tiny_engine.has_adapter("cand"))
    try:
        judged = gate.evaluate("cand", None, None)
    finally:
        tiny_engine.unload_adapter("cand")
    engine.calls.clear()
    _answer_from_gate(gate, None, anchors)
    assert not engine.calls
    assert [a.answer for a in anchors[:2]] == [r.active["answer"] for r in judged]
    assert not anchors[2].answered
