"""Anchors: which prompts are chosen, how the active model answers them, and the anchor term of a training step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from learners.anchor_loss import AnchorLoss, AnchorTraining, reference_context
from learners.anchors import BUILTIN_ANCHOR_PROBE, Anchor, answer_anchors, load_probe_prompts, select_anchors
from learners.examples import DemoExample
from learners.lora import LoraSettings, build_peft_model, load_base_model, load_tokenizer
from learners.sft_config import SFTSettings
from learners.sft_trainer import train_sft
from runtime.config import AnchorsConfig
from runtime.engines import SamplingParams
from runtime.store import Store


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.fixture
def store(tmp_path: Path):
    with Store(tmp_path / "s.duckdb") as s:
        yield s


def test_builtin_probe_loads_and_is_everyday_prompts() -> None:
    prompts = load_probe_prompts(BUILTIN_ANCHOR_PROBE)
    assert len(prompts) >= 30 and all(p[-1]["role"] == "user" and p[-1]["content"].strip() for p in prompts)
    assert len({p[-1]["content"] for p in prompts}) == len(prompts)


def test_sources_fill_in_order_and_skip_what_the_new_signals_ask(store: Store) -> None:
    settings = AnchorsConfig(sources=["log", "protected", "probe"], count=5)
    store.log_interaction(user("logged question"), "answer")
    picked = select_anchors(
        store, settings, protected=[user("Protected one?"), user("What is 2+2?")], exclude=[user("protected ONE")]
    )
    sources = [a.source for a in picked.anchors]
    assert sources[:2] == ["log", "protected"] and set(sources[2:]) == {"probe"} and len(sources) == 5
    texts = [a.messages[-1]["content"] for a in picked.anchors]
    assert "Protected one?" not in texts  # the new example asks it (normalised): no anchor argues with it
    assert picked.skipped == {"protected": 1}
    assert texts.count("What is 2+2?") == 1  # the protected prompt is also in the probe: taken once
    assert picked.counts() == {"log": 1, "protected": 1, "probe": 3}


def test_log_source_prefers_liked_and_never_uses_corrected_or_disliked(store: Store) -> None:
    ids = {name: store.log_interaction(user(name), "a") for name in ("plain", "liked", "corrected", "disliked")}
    store.add_signal("rating", interaction_id=ids["liked"], rating=1.0)
    store.add_signal("correction", interaction_id=ids["corrected"], text="better")
    store.add_signal("rating", interaction_id=ids["disliked"], rating=-1.0)
    store.log_interaction([*user("x" * 50)], "long one")
    settings = AnchorsConfig(sources=["log"], count=10, max_prompt_chars=40)
    texts = [a.messages[-1]["content"] for a in select_anchors(store, settings).anchors]
    assert texts == ["liked", "plain"]


def test_disabled_anchors_select_nothing(store: Store) -> None:
    store.log_interaction(user("q"), "a")
    assert select_anchors(store, AnchorsConfig(enabled=False)).anchors == []


def test_probe_file_replaces_the_builtin_probe(tmp_path: Path) -> None:
    probe = tmp_path / "probe.jsonl"
    probe.write_text(json.dumps({"prompt": "Mine?"}) + "\n")
    picked = select_anchors(None, AnchorsConfig(sources=["probe"], probe_file=probe))
    assert [a.messages for a in picked.anchors] == [user("Mine?")]


def test_the_active_model_answers_anchors_with_its_own_tokens(tiny_model_dir: Path) -> None:
    model, tokenizer = load_base_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    anchors = [Anchor(user("What is the capital of France?"), "probe"), Anchor(user("Hello"), "probe", [5], "x")]
    answer_anchors(model, tokenizer, anchors, max_new_tokens=6)
    first = anchors[0]
    assert first.answer_ids and 0 < len(first.answer_ids) <= 6 and first.answer is not None
    if tokenizer.eos_token_id in first.answer_ids:
        assert first.answer_ids[-1] == tokenizer.eos_token_id
    assert anchors[1].answer_ids == [5]  # already answered: kept (repair attempts reuse the answers)


def _answered(tiny_model_dir: Path, n: int = 4) -> list[Anchor]:
    model, tokenizer = load_base_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    anchors = [Anchor(user(f"Tell me about item {i}."), "probe") for i in range(n)]
    return answer_anchors(model, tokenizer, anchors, max_new_tokens=8)


def test_kl_term_is_zero_at_the_start_and_grows_when_the_model_moves(tiny_model_dir: Path) -> None:
    anchors = _answered(tiny_model_dir)
    tokenizer = load_tokenizer(tiny_model_dir)
    model = build_peft_model(load_base_model(tiny_model_dir), LoraSettings(r=4, alpha=8))
    kl = AnchorLoss(anchors, tokenizer, kind="kl", batch_size=4, reference=reference_context(model, None))
    assert float(kl(model).detach()) == pytest.approx(0.0, abs=1e-6)  # a fresh LoRA (B = 0) is the active model
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    moved = kl(model)
    assert float(moved) > 1e-3
    moved.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    sft = AnchorLoss(anchors, tokenizer, kind="sft", weight=2.0, batch_size=2)
    value = sft(model)
    assert float(value) > 0 and sft.history[-1] == pytest.approx(float(value) / 2.0)


def test_kl_keeps_the_active_distributions_and_gives_the_same_loss_as_recomputing_them(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first call keeps the active model's answer-token distributions; later steps take no reference forward
    pass, and the loss is the one a per-step reference gives."""
    from learners import anchor_loss as anchor_loss_module

    anchors = _answered(tiny_model_dir)
    tokenizer = load_tokenizer(tiny_model_dir)
    model = build_peft_model(load_base_model(tiny_model_dir), LoraSettings(r=4, alpha=8))
    entered: list[int] = []
    plain = reference_context(model, None)

    def counting(m):  # type: ignore[no-untyped-def]
        entered.append(1)
        return plain(m)

    cached = AnchorLoss(anchors, tokenizer, kind="kl", batch_size=2, reference=counting, seed=3)
    monkeypatch.setattr(anchor_loss_module, "REFERENCE_CACHE_BYTES", 0)
    recomputed = AnchorLoss(anchors, tokenizer, kind="kl", batch_size=2, reference=plain, seed=3)
    monkeypatch.undo()
    assert float(cached(model)) == pytest.approx(0.0, abs=1e-4)
    assert len(entered) == 1  # every anchor's distribution at once
    recomputed(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    for _ in range(3):
        expected = float(recomputed(model))
        assert float(cached(model)) == pytest.approx(expected, rel=1e-4, abs=1e-6) and expected > 1e-3
    assert len(entered) == 1


@pytest.mark.parametrize("kind", ["kl", "sft"])
def test_logits_only_where_answers_are_predicted_give_the_same_loss_and_gradients(
    tiny_model_dir: Path, kind: str
) -> None:
    """The output layer only sees the positions that predict answer tokens (``logits_to_keep``); the loss and
    the LoRA gradients are those of computing every position's logits."""
    anchors = _answered(tiny_model_dir)
    anchors[1].answer_ids = anchors[1].answer_ids[:2]  # rows of different lengths: padding after a short answer
    tokenizer = load_tokenizer(tiny_model_dir)
    model = build_peft_model(load_base_model(tiny_model_dir), LoraSettings(r=4, alpha=8))
    reference = reference_context(model, None) if kind == "kl" else None
    kept = AnchorLoss(anchors, tokenizer, kind=kind, batch_size=3, reference=reference, seed=1)
    full = AnchorLoss(anchors, tokenizer, kind=kind, batch_size=3, reference=reference, seed=1)
    full._logits_to_keep = False
    kept(model), full(model)  # the kl reference is taken before the model moves
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    lora = [p for p in model.parameters() if p.requires_grad]
    for _ in range(3):
        model.zero_grad()
        value = kept(model)
        value.backward()
        grads = [p.grad.clone() for p in lora]
        model.zero_grad()
        expected = full(model)
        expected.backward()
        assert float(value) == pytest.approx(float(expected), rel=1e-5) and float(expected) > 1e-3
        for got, want in zip(grads, [p.grad for p in lora], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert kept._logits_to_keep  # the model took logits_to_keep: no fallback


def test_a_model_without_logits_to_keep_gives_the_same_anchor_loss(tiny_model_dir: Path) -> None:
    anchors = _answered(tiny_model_dir)
    tokenizer = load_tokenizer(tiny_model_dir)
    model = load_base_model(tiny_model_dir)

    class Older(torch.nn.Module):  # a causal LM whose forward has no logits_to_keep
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):  # type: ignore[no-untyped-def]
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    older = AnchorLoss(anchors, tokenizer, kind="sft", batch_size=2, seed=1)
    current = AnchorLoss(anchors, tokenizer, kind="sft", batch_size=2, seed=1)
    with torch.no_grad():
        assert float(older(Older())) == pytest.approx(float(current(model)), rel=1e-5)
    assert not older._logits_to_keep and current._logits_to_keep


def test_kl_reference_is_the_parent_adapter_frozen(tiny_model_dir: Path, tiny_adapter_dir: Path) -> None:
    anchors = _answered(tiny_model_dir)
    model = build_peft_model(load_base_model(tiny_model_dir), parent_adapter_dir=tiny_adapter_dir)
    reference = reference_context(model, tiny_adapter_dir)
    kl = AnchorLoss(anchors, load_tokenizer(tiny_model_dir), kind="kl", reference=reference)
    assert float(kl(model)) == pytest.approx(0.0, abs=1e-5)  # the student starts as the parent
    frozen = [p for n, p in model.named_parameters() if ".anchor_reference." in n]
    assert frozen and not any(p.requires_grad for p in frozen)


def test_anchor_loss_needs_answers_and_a_reference_for_kl(tiny_model_dir: Path) -> None:
    tokenizer = load_tokenizer(tiny_model_dir)
    with pytest.raises(ValueError, match="no answered anchor"):
        AnchorLoss([Anchor(user("q"), "probe")], tokenizer)
    with pytest.raises(ValueError, match="reference"):
        AnchorLoss(_answered(tiny_model_dir, 1), tokenizer, kind="kl")


def _kl_on(model_dir: Path, adapter_dir: Path, anchors: list[Anchor]) -> float:
    """Mean per-token KL(base || adapter) on the anchors' answers: how far the update moved the model there."""
    tokenizer = load_tokenizer(model_dir)
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_base_model(model_dir), str(adapter_dir))
    loss = AnchorLoss(anchors, tokenizer, kind="kl", batch_size=len(anchors), reference=lambda m: m.disable_adapter())
    with torch.no_grad():
        return float(loss(model))


def _train(tiny_model_dir: Path, out: Path, anchors: AnchorTraining | None):
    examples = [DemoExample(user("What is the secret?"), "The secret is blue tomatoes and green rain.")]
    settings = SFTSettings(num_epochs=8, min_steps=0, learning_rate=2e-2, batch_size=1, use_cpu=True)
    return train_sft(tiny_model_dir, examples, out, settings, LoraSettings(r=4, alpha=8), anchors=anchors)


def test_kl_anchors_keep_the_model_where_it_was_on_them(tiny_model_dir: Path, tmp_path: Path) -> None:
    anchors = _answered(tiny_model_dir, 6)
    plain = _train(tiny_model_dir, tmp_path / "plain", None)
    anchored = _train(tiny_model_dir, tmp_path / "kl", AnchorTraining(anchors, loss="kl", weight=5.0, batch_size=6))
    assert "anchor_loss" in anchored.metrics[-1]
    moved_plain = _kl_on(tiny_model_dir, plain.adapter_dir, anchors)
    assert _kl_on(tiny_model_dir, anchored.adapter_dir, anchors) < 0.5 * moved_plain


def test_sft_anchors_train_on_the_active_answers(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The ``sft`` anchor loss is cross-entropy on the greedy answers; it falls as the model fits them (which
    sharpens the distribution there, so it does not keep the KL low: measured, ``kl`` is the default)."""
    anchors = AnchorTraining(_answered(tiny_model_dir, 6), loss="sft", weight=1.0, batch_size=6)
    result = _train(tiny_model_dir, tmp_path / "sft", anchors)
    values = [row["anchor_loss"] for row in result.metrics if "anchor_loss" in row]
    assert len(values) == 8 and values[-1] < values[0]


def test_balance_weighs_an_anchor_as_much_as_a_new_example() -> None:
    six = [Anchor(user(f"q{i}"), "probe", [5], "x", True) for i in range(6)]
    balanced = AnchorTraining(six, weight=2.0, batch_size=2)
    assert balanced.step_weight(1) == balanced.step_weight(2) == balanced.step_weight(None) == 2.0  # never above
    assert balanced.step_weight(8) == 0.5  # 2 anchors beside 8 new examples: 2.0 x 2 / 8
    assert AnchorTraining(six[:1], weight=1.0, batch_size=2).step_weight(4) == 0.25  # one anchor per step
    assert AnchorTraining(six, weight=1.0, batch_size=2, balance="none").step_weight(8) == 1.0
    with pytest.raises(ValueError, match="balance"):
        AnchorTraining(six, balance="loud")  # type: ignore[arg-type]


def test_the_sft_trainer_balances_the_anchor_term_against_its_batch(tiny_model_dir: Path, tmp_path: Path) -> None:
    from learners.sft_trainer import build_sft_trainer

    examples = [DemoExample(user(f"Question {i}?"), f"Answer {i}.") for i in range(6)]
    anchors = AnchorTraining(_answered(tiny_model_dir, 2), weight=1.0, batch_size=2)
    trainer = build_sft_trainer(
        tiny_model_dir, examples, tmp_path / "out", SFTSettings(batch_size=4, max_steps=1), anchors=anchors
    )
    assert trainer.anchor_loss is not None and trainer.anchor_loss.weight == 0.5
    few = build_sft_trainer(
        tiny_model_dir, examples[:2], tmp_path / "few", SFTSettings(batch_size=4, max_steps=1), anchors=anchors
    )
    assert few.anchor_loss is not None and few.anchor_loss.weight == 1.0


def test_the_sdft_trainer_balances_the_anchor_term_against_its_micro_batch(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from learners.sdft_config import SDFTSettings
    from learners.sdft_trainer import build_sdft_trainer

    examples = [DemoExample(user(f"Question {i}?"), f"Answer {i}.") for i in range(8)]
    anchors = AnchorTraining(_answered(tiny_model_dir, 2), weight=1.0, batch_size=2)
    settings = SDFTSettings(prompts_per_step=4, num_rollouts=2, micro_batch_size=4, max_steps=1)
    trainer = build_sdft_trainer(tiny_model_dir, examples, tmp_path / "out", settings, anchors=anchors)
    assert trainer.args.per_device_train_batch_size == 4
    assert trainer._anchor_loss is not None and trainer._anchor_loss.weight == 0.5


def test_probe_anchors_closest_to_the_taught_prompts_come_first() -> None:
    taught = [user("What is the capital of Orvania?")]
    picked = select_anchors(None, AnchorsConfig(sources=["probe"], count=3), exclude=taught)
    assert all("capital" in a.messages[-1]["content"] for a in picked.anchors)


def test_probe_anchors_cover_the_neighbourhood_of_every_taught_prompt(tmp_path: Path) -> None:
    """Closest first for each taught prompt in turn: three capitals are closer to the capital question than the
    river prompt is to the river question, yet two anchors give one of each (not two capitals)."""
    probe = tmp_path / "probe.jsonl"
    prompts = ["What is the capital of Japan?", "What is the capital of Spain?", "What is the capital of Peru?",
               "What is the longest river in Africa?", "Say hello."]
    probe.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    taught = [user("What is the capital of Orvania?"), user("Which river flows through Zembla?")]
    two = select_anchors(None, AnchorsConfig(sources=["probe"], count=2, probe_file=probe), exclude=taught)
    assert [a.messages[-1]["content"] for a in two.anchors] == [prompts[0], prompts[3]]
    every = select_anchors(None, AnchorsConfig(sources=["probe"], count=5, probe_file=probe), exclude=taught)
    assert [a.messages[-1]["content"] for a in every.anchors] == [prompts[i] for i in (0, 3, 1, 2, 4)]


def test_farthest_order_gives_the_probe_prompts_least_like_the_taught_ones_first(tmp_path: Path) -> None:
    """``probe_order: farthest``: prompts sharing no word with any taught prompt first (file order), then the
    least related; the capital closest to the taught capital comes last."""
    probe = tmp_path / "probe.jsonl"
    prompts = ["What is the capital of Japan?", "Say hello.", "Which capital of Peru is oldest?",
               "What is the longest river in Africa?", "Count to three."]
    probe.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    taught = [user("What is the capital of Orvania?")]
    settings = AnchorsConfig(sources=["probe"], count=5, probe_file=probe, probe_order="farthest")
    picked = select_anchors(None, settings, exclude=taught)
    assert [a.messages[-1]["content"] for a in picked.anchors] == [prompts[i] for i in (1, 3, 4, 2, 0)]
    settings.probe_order = "mixed"  # nearest, farthest, second nearest, second farthest, ...
    picked = select_anchors(None, settings, exclude=taught)
    assert [a.messages[-1]["content"] for a in picked.anchors] == [prompts[i] for i in (0, 1, 2, 3, 4)]
    with pytest.raises(ValueError, match="probe_order"):
        AnchorsConfig.model_validate({"probe_order": "closest"})


def test_a_large_update_takes_more_anchors_in_the_large_update_order(tmp_path: Path) -> None:
    """``per_example``: past ``count / per_example`` examples the count grows with the update, and the probe is
    taken in ``large_update_order``; a correction of a few examples keeps ``count`` and ``probe_order``."""
    probe = tmp_path / "probe.jsonl"
    prompts = ["What is the capital of Japan?", "Say hello.", "Which capital of Peru is oldest?",
               "What is the longest river in Africa?", "Count to three.", "Name a colour."]
    probe.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    taught = [user("What is the capital of Orvania?")]
    settings = AnchorsConfig(sources=["probe"], count=2, per_example=1.5, probe_file=probe)
    assert [settings.count_for(n) for n in (None, 1, 3, 4)] == [2, 2, 5, 6]
    small = select_anchors(None, settings, exclude=taught, examples=1)
    assert [a.messages[-1]["content"] for a in small.anchors] == [prompts[0], prompts[2]]  # nearest
    large = select_anchors(None, settings, exclude=taught, examples=3)
    assert [a.messages[-1]["content"] for a in large.anchors] == prompts[:5]  # mixed: nearest, farthest in turn
    settings.large_update_order = "nearest"
    large = select_anchors(None, settings, exclude=taught, examples=3)
    assert [a.messages[-1]["content"] for a in large.anchors][:2] == [prompts[0], prompts[2]]
    assert [settings.weight_for(n) for n in (None, 1, 3)] == [1.0, 1.0, 0.5]  # large_update_weight
    assert [settings.loss_for(n) for n in (None, 1, 3)] == ["kl", "kl", "sft"]  # large_update_loss
    settings.large_update_weight = None
    settings.large_update_loss = None
    assert [settings.weight_for(n) for n in (None, 1, 3)] == [1.0, 1.0, 1.0]  # null: weight
    assert [settings.loss_for(n) for n in (None, 1, 3)] == ["kl", "kl", "kl"]  # null: loss
    settings.per_example = 0
    assert len(select_anchors(None, settings, exclude=taught, examples=100).anchors) == 2
    assert settings.weight_for(100) == 1.0
    with pytest.raises(ValueError, match="per_example"):
        AnchorsConfig.model_validate({"per_example": -1})
    with pytest.raises(ValueError, match="large_update_weight"):
        AnchorsConfig.model_validate({"large_update_weight": 0})
    with pytest.raises(ValueError, match="large_update_loss"):
        AnchorsConfig.model_validate({"large_update_loss": "mse"})


def test_an_engine_answer_becomes_the_tokens_the_chat_template_puts_after_the_prompt(tiny_model_dir: Path) -> None:
    from learners.anchors import tokenise_answers

    tokenizer = load_tokenizer(tiny_model_dir)
    ended = Anchor(user("Capital of France?"), "probe", answer="Paris is the capital.", finished=True)
    cut = Anchor(user("Capital of France?"), "probe", answer="Paris is the", finished=False)
    kept = Anchor(user("Hello"), "probe", [5], "x", True)
    tokenise_answers(tokenizer, [ended, cut, kept])
    assert tokenizer.decode(ended.answer_ids) == "Paris is the capital.<|im_end|>"
    assert tokenizer.decode(cut.answer_ids) == "Paris is the"
    assert kept.answer_ids == [5]


def test_an_answer_written_for_a_longer_cap_is_cut_to_the_anchor_cap(tiny_model_dir: Path) -> None:
    from learners.anchors import tokenise_answers

    tokenizer = load_tokenizer(tiny_model_dir)
    long = Anchor(user("Capital of France?"), "protected", answer="Paris is the capital of France.", finished=True)
    short = Anchor(user("Say hi."), "protected", answer="Hi", finished=True)
    tokenise_answers(tokenizer, [long, short], max_new_tokens=3)
    assert len(long.answer_ids) == 3 and long.finished is False
    assert long.answer == tokenizer.decode(long.answer_ids) and "Paris is the capital".startswith(long.answer)
    assert tokenizer.decode(short.answer_ids) == "Hi<|im_end|>" and short.finished is True


def test_the_serving_engine_answers_anchors_in_one_call(tiny_engine) -> None:
    from learners.anchors import answer_with_engine

    anchors = [Anchor(user("What is the capital of France?"), "probe"), Anchor(user("Hi"), "probe", [5], "x", True)]
    answer_with_engine(tiny_engine, None, anchors, max_new_tokens=3)
    served = tiny_engine.chat([anchors[0].messages], SamplingParams(max_new_tokens=3, temperature=0.0))[0]
    assert (anchors[0].answer, anchors[0].finished) == (served.text, served.finish_reason == "stop")
    assert anchors[0].answer_ids is None  # the training process writes the ids
    assert (anchors[1].answer, anchors[1].answer_ids) == ("x", [5])


def test_an_engine_answer_that_does_not_tokenise_back_is_left_to_the_worker(tiny_engine) -> None:
    # A random model emits byte tokens that are not whole UTF-8 characters; their text holds U+FFFD and would
    # tokenise into other tokens than the model said, so the training process must answer those anchors itself.
    from learners.anchors import answer_with_engine

    prompts = [f"Tell me about topic {n}." for n in range(16)]
    params = SamplingParams(max_new_tokens=2, temperature=0.0)
    served = [g.text for g in tiny_engine.chat([user(p) for p in prompts], params)]
    assert any("\ufffd" in t for t in served) and any("\ufffd" not in t for t in served), served
    anchors = [Anchor(user(p), "probe") for p in prompts]
    answer_with_engine(tiny_engine, None, anchors, max_new_tokens=2)
    for anchor, text in zip(anchors, served, strict=True):
        if "\ufffd" in text:
            assert (anchor.answer, anchor.finished, anchor.answer_ids) == (None, None, None)
        else:
            assert anchor.answer == text and anchor.finished is not None
