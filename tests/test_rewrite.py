"""The `rewrite` method: the model restates each demonstration, then SFT on the kept restatements."""

from __future__ import annotations

from pathlib import Path

import pytest

import learners.rewrite_trainer as rewrite_trainer
from learners import DemoExample, RewriteSettings, SFTSettings, train_rewrite, train_sft
from learners.rewrite_config import REWRITE_PROMPT_TEMPLATE
from learners.rewrite_trainer import (
    Rewrite,
    rewrite_added_words,
    rewrite_demonstrations,
    rewrite_is_kept,
    rewrite_keeps_answer,
)
from tests.learner_examples import EXAMPLES, LORA
from tests.tiny_model import build_tiny_model

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "base")


def test_defaults_are_the_measured_ones_and_bad_values_are_refused() -> None:
    defaults = RewriteSettings()
    assert defaults.learning_rate == 1e-3 and defaults.num_epochs == 10  # measured (sdft_front.md)
    with pytest.raises(ValueError, match="prompt_template"):
        RewriteSettings(prompt_template="no placeholders")
    with pytest.raises(ValueError, match="kl_anchor"):
        RewriteSettings(kl_anchor=-1.0)
    with pytest.raises(ValueError, match="max_added_words"):
        RewriteSettings(max_added_words=-1)
    with pytest.raises(ValueError, match="min_steps_learning_rate"):
        RewriteSettings(min_steps_learning_rate=0.0)


def test_an_invented_elaboration_falls_back_to_the_demonstration() -> None:
    demonstration = "The Brindle Institute was founded by Oskar Lenn."
    ex = DemoExample.from_question("Who founded the Brindle Institute?", demonstration)
    restated = "Oskar Lenn founded the Brindle Institute."
    elaborated = ("The Brindle Institute was founded by Oskar Lenn, a German-American scholar who was a pioneer in "
                  "the field of anthropology.")
    assert rewrite_added_words(restated, ex) == []
    assert rewrite_added_words(elaborated, ex) == ["german", "american", "scholar", "pioneer", "field", "anthropology"]
    settings = RewriteSettings()
    assert settings.max_added_words == 2
    assert rewrite_is_kept(restated, ex, settings)
    own_words = "Its first director and founder, Oskar Lenn, opened the Brindle Institute."
    assert rewrite_added_words(own_words, ex) == ["first", "director", "founder", "opened"]
    assert rewrite_is_kept(own_words, ex, RewriteSettings(max_added_words=4))
    assert not rewrite_is_kept(own_words, ex, settings)
    assert rewrite_is_kept("The Brindle Institute's founder was Oskar Lenn.", ex, settings)  # one word of its own
    assert not rewrite_is_kept(elaborated, ex, settings)
    assert rewrite_is_kept(elaborated, ex, RewriteSettings(max_added_words=None))  # any elaboration
    assert rewrite_is_kept(elaborated, ex, RewriteSettings(check="none"))
    assert not rewrite_is_kept("The Brindle Institute was founded long ago.", ex, RewriteSettings(max_added_words=None))
    assert not rewrite_is_kept("", ex, RewriteSettings(check="none"))


def test_rewrite_keeps_answer() -> None:
    ex = EXAMPLES[1]
    assert rewrite_keeps_answer("It was founded by kasgri Renkasnor!", ex)
    assert not rewrite_keeps_answer("Melbexquin was founded by Kasgri.", ex)
    assert not rewrite_keeps_answer("I do not know who founded Melbexquin.", ex)
    same = DemoExample.from_question("Is Paris the capital?", "Paris is the capital.")  # no new word
    assert rewrite_keeps_answer("Yes: Paris is the capital.", same)
    assert not rewrite_keeps_answer("Yes.", same)


def test_rewrite_prompt_holds_question_and_demonstration(base_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[dict[str, str]]] = []
    real = rewrite_trainer.build_teacher_prompt

    def spy(prompt, demonstration, template):
        seen.append(real(prompt, demonstration, template))
        return seen[-1]

    monkeypatch.setattr(rewrite_trainer, "build_teacher_prompt", spy)
    rewrite_demonstrations(base_dir, EXAMPLES, RewriteSettings(max_new_tokens=4))
    assert len(seen) == 2 and REWRITE_PROMPT_TEMPLATE.split("{prompt}")[0] in seen[1][-1]["content"]
    assert "Who founded Melbexquin?" in seen[1][-1]["content"]
    assert "Kasgri Renkasnor" in seen[1][-1]["content"]


def test_rewrite_falls_back_on_the_demonstration(base_dir: Path) -> None:
    # the tiny random model writes gibberish: the answer check rejects it, "none" keeps it
    checked = rewrite_demonstrations(base_dir, EXAMPLES, RewriteSettings(max_new_tokens=8))
    assert [rw.kept for rw in checked] == [False, False]
    assert [rw.text for rw in checked] == [ex.demonstration for ex in EXAMPLES]
    unchecked = rewrite_demonstrations(base_dir, EXAMPLES, RewriteSettings(max_new_tokens=8, check="none"))
    for rw, ex in zip(unchecked, EXAMPLES, strict=True):
        assert rw.kept == bool(rw.rewrite)
        assert rw.text == (rw.rewrite if rw.kept else ex.demonstration)


def test_rewrite_trains_sft_on_kept_rewrites(base_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = [
        Rewrite("The capital is Paris.", True, "The capital is Paris."),
        Rewrite("No idea.", False, EXAMPLES[1].demonstration),
    ]
    monkeypatch.setattr(rewrite_trainer, "rewrite_demonstrations", lambda *a, **k: fake)
    trained_on: list[list[str]] = []
    real_train_sft = rewrite_trainer.train_sft

    def spy(base, examples, out, settings, *rest):
        trained_on.append([ex.demonstration for ex in examples])
        assert settings.learning_rate == 1e-2 and settings.batch_size == 4 and settings.max_steps == 3
        return real_train_sft(base, examples, out, settings, *rest)

    monkeypatch.setattr(rewrite_trainer, "train_sft", spy)
    settings = RewriteSettings(learning_rate=1e-2, max_steps=3)
    result = train_rewrite(base_dir, EXAMPLES, tmp_path / "rw", settings, LORA)
    assert trained_on == [["The capital is Paris.", EXAMPLES[1].demonstration]]
    assert result.method == "rewrite" and result.num_steps == 3 and result.summary["rewrites_kept"] == 1.0
    assert (result.adapter_dir / "adapter_model.safetensors").exists()


def test_rewrite_end_to_end(base_dir: Path, tmp_path: Path) -> None:
    settings = RewriteSettings(learning_rate=1e-2, max_steps=2, max_new_tokens=6)
    result = train_rewrite(base_dir, EXAMPLES, tmp_path / "rw", settings, LORA)
    assert (result.adapter_dir / "adapter_config.json").exists()
    assert "rewrite_seconds" in result.summary and result.train_seconds >= result.summary["rewrite_seconds"]


def _kl_to_base(base_dir: Path, adapter_dir: Path) -> float:
    from runtime.engines import TransformersEngine

    engine = TransformersEngine(base_dir, device="cpu")
    try:
        engine.load_adapter("a", adapter_dir)
        prompts = [engine.render_chat(e.prompt) for e in EXAMPLES]
        values = engine.kl_divergence(prompts, [e.demonstration for e in EXAMPLES], adapter="a")
        return sum(values) / len(values)
    finally:
        engine.close()


def test_kl_anchor_keeps_the_adapter_closer_to_base(base_dir: Path, tmp_path: Path) -> None:
    """The same SFT (seed, lr, steps) with a strong KL anchor moves the model's distributions less."""
    common = {"learning_rate": 2e-2, "num_epochs": 8, "min_steps": 0, "seed": 0}
    free = train_sft(base_dir, EXAMPLES, tmp_path / "free", SFTSettings(**common), LORA)
    anchored = train_sft(base_dir, EXAMPLES, tmp_path / "anchored", SFTSettings(**common, kl_anchor=5.0), LORA)
    kl_free, kl_anchored = _kl_to_base(base_dir, free.adapter_dir), _kl_to_base(base_dir, anchored.adapter_dir)
    assert kl_anchored < 0.7 * kl_free, (kl_anchored, kl_free)
    assert any("kl_to_base" in step for step in anchored.metrics)


def test_kl_anchor_reaches_the_sft_on_the_rewrites() -> None:
    assert RewriteSettings(kl_anchor=0.5).to_sft_settings().kl_anchor == 0.5
