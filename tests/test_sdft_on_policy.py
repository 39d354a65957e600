"""On-policy SDFT's switches beyond TRL's: rollout mixing, the direct teacher template, SFT warm-up."""

from __future__ import annotations

from pathlib import Path

import pytest

from learners import SDFTSettings, build_sdft_trainer, train_sdft
from learners.sdft_config import DIRECT_TEACHER_PROMPT_TEMPLATE
from tests.learner_examples import EXAMPLES, LORA
from tests.tiny_model import build_tiny_model

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


def test_sft_warmup_then_on_policy_sdft(base_dir: Path, tmp_path: Path) -> None:
    settings = SDFTSettings.official(
        learning_rate=1e-2, max_steps=1, max_completion_length=4, prompts_per_step=2, sft_warmup_epochs=2
    )
    result = train_sdft(base_dir, EXAMPLES, tmp_path / "out", settings, LORA)
    assert (result.adapter_dir / "adapter_config.json").exists()
    assert result.summary["sft_warmup_steps"] >= 1
    assert result.train_seconds >= result.summary["sft_warmup_seconds"]
    assert not (tmp_path / "out.sft-warmup").exists()  # the warm-up adapter was a scratch step
    with pytest.raises(ValueError, match="sft_warmup_epochs"):
        SDFTSettings(sft_warmup_epochs=-1)
