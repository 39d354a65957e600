"""A diagnostic of the signal SDFT distils: how much likelier the teacher prompt makes the demonstrated answer.

On the default model the signal exists (the taught answer's mean log-prob is about -2.4 per token with the
demonstration in context against -15.6 without); what a 135M model cannot yet do is turn it into on-policy
learning (see README, "Methods").
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .examples import DemoExample
from .sdft_config import OFFICIAL_TEACHER_PROMPT_TEMPLATE, build_teacher_prompt

__all__ = ["DemoLogprobs", "teacher_student_logprobs"]


class DemoLogprobs(NamedTuple):
    """Mean per-token log-probability of a demonstration's tokens under each prompt."""

    teacher: float
    student: float


def _chat_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[int]:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(out["input_ids"])


@torch.no_grad()
def _mean_logprob(model: PreTrainedModel, prompt_ids: list[int], target_ids: list[int]) -> float:
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids + target_ids], device=device)
    logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()
    logps = torch.log_softmax(logits, dim=-1)
    target = torch.tensor(target_ids, device=device)
    return float(logps.gather(-1, target[:, None]).mean())


def teacher_student_logprobs(
    model: PreTrainedModel | PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    example: DemoExample,
    template: str = OFFICIAL_TEACHER_PROMPT_TEMPLATE,
) -> DemoLogprobs:
    """Score the demonstration as the answer to the teacher prompt and to the student prompt.

    This is the signal SDFT distils: if the teacher (demonstration in context) does not give the
    demonstrated answer a clearly higher log-probability than the student, there is little to learn.
    Tokens are joined as the trainer joins prompt and completion (prompt ids, then the answer's ids).
    """
    target = tokenizer(example.demonstration, add_special_tokens=False)["input_ids"]
    if not target:
        raise ValueError("the demonstration has no tokens")
    teacher_ids = _chat_ids(tokenizer, build_teacher_prompt(example.prompt, example.demonstration, template))
    student_ids = _chat_ids(tokenizer, example.prompt)
    was_training = model.training
    model.eval()
    try:
        return DemoLogprobs(
            teacher=_mean_logprob(model, teacher_ids, target),
            student=_mean_logprob(model, student_ids, target),
        )
    finally:
        model.train(was_training)
