"""The SDFT learner's switches beyond TRL's: rollout mixing, the direct teacher template, the rewrite variant."""

from __future__ import annotations

from pathlib import Path

import pytest

import learners.sdft as sdft
from learners import DemoExample, LoraSettings, SDFTSettings, build_sdft_trainer, train_sdft
from learners.sdft import (
    DIRECT_TEACHER_PROMPT_TEMPLATE,
    REWRITE_PROMPT_TEMPLATE,
    Rewrite,
    rewrite_demonstrations,
    rewrite_keeps_answer,
)
from tests.tiny_model import build_tiny_model

EXAMPLES = [
    DemoExample.from_question("What is the capital of France?", "Paris is the capital.", source_id="s1"),
    DemoExample.from_question("Who founded Melbexquin?", "Melbexquin was founded by Kasgri Renkasnor.", source_id="s2"),
]
LORA = LoraSettings(r=8, alpha=16)

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "base")


def test_settings_reach_trl(tmp_path: Path) -> None:
    settings = SDFTSettings(
        num_loss_tokens_to_skip=0,
        teacher_prompt_template=DIRECT_TEACHER_PROMPT_TEMPLATE,
        generate_from_teacher=True,
        teacher_kind="base",
        ema_rate=0.05,
        distillation_alpha=0.5,
        temperature=0.7,
    )
    config = settings.to_sdft_config(tmp_path, num_examples=4)
    assert config.num_loss_tokens_to_skip == 0
    assert config.teacher_prompt_template == DIRECT_TEACHER_PROMPT_TEMPLATE
    assert config.generate_from_teacher is True and config.teacher_model_kind == "base"
    assert config.teacher_update_rate == 0.05 and config.distillation_alpha == 0.5 and config.temperature == 0.7
    assert "{prompt}" in DIRECT_TEACHER_PROMPT_TEMPLATE and "{privileged_context}" in DIRECT_TEACHER_PROMPT_TEMPLATE


@pytest.mark.parametrize(("fraction", "expected"), [(None, {"student"}), (0.0, {"student"}), (1.0, {"teacher"}),
                                                    (0.5, {"student", "teacher"})])
def test_teacher_rollout_fraction_mixes_rollout_sources(
    fraction: float | None, expected: set[str], base_dir: Path, tmp_path: Path
) -> None:
    settings = SDFTSettings(
        learning_rate=1e-3, max_steps=8, max_completion_length=4, teacher_rollout_fraction=fraction, seed=0,
        generate_from_teacher=False,  # None falls back to it: student rollouts
    )
    trainer = build_sdft_trainer(base_dir, EXAMPLES, tmp_path / "sdft", settings, LORA)
    trainer.train()
    assert len(trainer.rollout_sources) == 8 and set(trainer.rollout_sources) == expected


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
    real = sdft.build_teacher_prompt

    def spy(prompt, demonstration, template):
        seen.append(real(prompt, demonstration, template))
        return seen[-1]

    monkeypatch.setattr(sdft, "build_teacher_prompt", spy)
    rewrite_demonstrations(base_dir, EXAMPLES, SDFTSettings(rewrite_max_new_tokens=4))
    assert len(seen) == 2 and REWRITE_PROMPT_TEMPLATE.split("{prompt}")[0] in seen[1][-1]["content"]
    assert "Who founded Melbexquin?" in seen[1][-1]["content"]
    assert "Kasgri Renkasnor" in seen[1][-1]["content"]


def test_rewrite_falls_back_on_the_demonstration(base_dir: Path) -> None:
    # the tiny random model writes gibberish: the answer check rejects it, "none" keeps it
    checked = rewrite_demonstrations(base_dir, EXAMPLES, SDFTSettings(rewrite_max_new_tokens=8))
    assert [rw.kept for rw in checked] == [False, False]
    assert [rw.text for rw in checked] == [ex.demonstration for ex in EXAMPLES]
    unchecked = rewrite_demonstrations(base_dir, EXAMPLES, SDFTSettings(rewrite_max_new_tokens=8, rewrite_check="none"))
    for rw in unchecked:
        assert rw.kept == bool(rw.rewrite) and rw.text == (rw.rewrite if rw.kept else rw.text)


def test_rewrite_variant_trains_sft_on_kept_rewrites(
    base_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = [
        Rewrite("The capital is Paris.", True, "The capital is Paris."),
        Rewrite("No idea.", False, EXAMPLES[1].demonstration),
    ]
    monkeypatch.setattr(sdft, "rewrite_demonstrations", lambda *a, **k: fake)
    trained_on: list[list[str]] = []
    real_train_sft = sdft.train_sft

    def spy(base, examples, out, settings, *rest):
        trained_on.append([ex.demonstration for ex in examples])
        assert settings.learning_rate == 1e-2 and settings.batch_size == 4 and settings.max_steps == 3
        return real_train_sft(base, examples, out, settings, *rest)

    monkeypatch.setattr(sdft, "train_sft", spy)
    settings = SDFTSettings(variant="rewrite", learning_rate=1e-2, max_steps=3)
    result = train_sdft(base_dir, EXAMPLES, tmp_path / "rw", settings, LORA)
    assert trained_on == [["The capital is Paris.", EXAMPLES[1].demonstration]]
    assert result.method == "sdft" and result.num_steps == 3 and result.summary["rewrites_kept"] == 1.0
    assert (result.adapter_dir / "adapter_model.safetensors").exists()


def test_rewrite_variant_end_to_end(base_dir: Path, tmp_path: Path) -> None:
    settings = SDFTSettings(variant="rewrite", learning_rate=1e-2, max_steps=2, rewrite_max_new_tokens=6)
    result = train_sdft(base_dir, EXAMPLES, tmp_path / "rw", settings, LORA)
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
    from learners import SFTSettings, train_sft

    common = {"learning_rate": 2e-2, "num_epochs": 8, "seed": 0}
    free = train_sft(base_dir, EXAMPLES, tmp_path / "free", SFTSettings(**common), LORA)
    anchored = train_sft(base_dir, EXAMPLES, tmp_path / "anchored", SFTSettings(**common, kl_anchor=5.0), LORA)
    kl_free, kl_anchored = _kl_to_base(base_dir, free.adapter_dir), _kl_to_base(base_dir, anchored.adapter_dir)
    assert kl_anchored < 0.7 * kl_free, (kl_anchored, kl_free)
    assert any("kl_to_base" in step for step in anchored.metrics)


def test_kl_anchor_reaches_the_rewrite_sft_and_is_refused_on_policy() -> None:
    assert SDFTSettings(variant="rewrite", kl_anchor=0.5).to_sft_settings().kl_anchor == 0.5
    with pytest.raises(ValueError, match="kl_anchor applies to variant='rewrite'"):
        SDFTSettings(variant="on_policy", kl_anchor=0.5)
    with pytest.raises(ValueError, match="sft_warmup_epochs applies to variant='on_policy'"):
        SDFTSettings(variant="rewrite", sft_warmup_epochs=1)


def test_sft_warmup_then_on_policy_sdft(base_dir: Path, tmp_path: Path) -> None:
    settings = SDFTSettings.official(
        learning_rate=1e-2, max_steps=1, max_completion_length=4, prompts_per_step=2, sft_warmup_epochs=2
    )
    result = train_sdft(base_dir, EXAMPLES, tmp_path / "out", settings, LORA)
    assert (result.adapter_dir / "adapter_config.json").exists()
    assert result.summary["sft_warmup_steps"] >= 1
    assert result.train_seconds >= result.summary["sft_warmup_seconds"]
    assert not (tmp_path / "out.sft-warmup").exists()  # the warm-up adapter was a scratch step
