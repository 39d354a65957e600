"""Anchors: prompts answered by the active model itself, trained beside the new examples.

A small update (one or two corrections in a fresh store, where replay has nothing to mix in yet) can break
unrelated behaviours: after learning one fictional capital, the model may name it as the capital of a real
country. Anchors pull the update towards what the serving model already does elsewhere: each is a prompt
with the active model's own greedy answer (on-policy, as in SDFT, but applied to retention), and the update
is trained on the new examples plus ``weight`` x a loss on a batch of anchors at every step
(:mod:`learners.anchor_loss`): KL to the active model for a small update, cross-entropy on its answers for a
large one (``loss``, ``large_update_loss``).

Prompts come from the sources of ``learning.anchors.sources``, in order, until ``count`` are chosen (a large
update takes ``per_example`` anchors per example it trains on when that is more, and its probe prompts in
``large_update_order``: it moves the model everywhere, not only near its own content):

- ``log``: recent live traffic, positively rated first, then the newest; never a conversation that was
  corrected or rated negatively, and never a prompt one of the new signals is about;
- ``protected``: the policy's protected prompts;
- ``probe``: a built-in set of everyday prompts (:data:`BUILTIN_ANCHOR_PROBE`), for a fresh store; those
  closest to what the new examples ask come first, taken in turn for each new example (an update bleeds most
  into neighbouring prompts: teaching the capital of an invented country endangers the capitals of real ones;
  see :func:`nearest_first`); ``probe_order`` may instead put those farthest from them first
  (:func:`farthest_first`) or take one of each in turn (:func:`mixed_first`).

No source ever gives a prompt that a new example asks (an anchor there would argue with the correction).
Gate-guided repair adds the prompts of the checks that vetoed a candidate (source ``repair``).

The answers are the active model's (the base model with the adapter the update starts from), greedy. With a
serving engine (a cycle run by the service), that engine writes them before the worker starts
(:func:`answer_with_engine`: the answers users are served, and no second model load for them; protected
prompts take the answers the policy gate asks the active model for anyway, cut to ``max_new_tokens``) and the
worker turns them into token ids (:func:`tokenise_answers`); otherwise the worker writes them
(:func:`answer_anchors`).
They are kept in the cycle so that repair attempts reuse them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from itertools import zip_longest
from pathlib import Path
from typing import Any, Literal

from runtime.chat_encoding import encode_chat_answer
from runtime.config import AnchorsConfig
from runtime.engines.base import Engine, Generation, SamplingParams
from runtime.jsonl import read_jsonl
from runtime.store import Store
from runtime.textmatch import content_words, normalise

BUILTIN_ANCHOR_PROBE = Path(__file__).parent / "data" / "anchor_probe.jsonl"
"""Everyday prompts (questions, arithmetic, formats, instructions, short reading comprehension) written for
this package; distinct from any evaluation set."""

AnchorOrigin = Literal["log", "protected", "probe", "repair"]
Messages = list[dict[str, str]]


@dataclass
class Anchor:
    """One anchor prompt, and once answered, the active model's answer.

    Attributes:
        messages: The conversation, ending with a user turn.
        source: Where it came from (``log``, ``protected``, ``probe`` or ``repair``).
        answer_ids: The active model's greedy answer as token ids (with the end-of-turn token when the answer
            ended by itself); ``None`` until :func:`answer_anchors` or :func:`tokenise_answers` fills it.
        answer: The same answer as text (for records and people); an engine's answer is text first, and
            :func:`tokenise_answers` writes its ids.
        finished: Whether the answer ended by itself (``False``: cut at ``max_new_tokens``); ``None`` until
            answered.
    """

    messages: Messages
    source: AnchorOrigin
    answer_ids: list[int] | None = None
    answer: str | None = None
    finished: bool | None = None

    @property
    def answered(self) -> bool:
        """Whether the answer is written, as token ids or as text (:func:`tokenise_answers` writes its ids)."""
        return self.answer_ids is not None or self.answer is not None

    def take_answer(self, generation: Generation) -> None:
        """Take a served answer (an engine's :class:`~runtime.engines.base.Generation`) as this anchor's text
        answer; the worker writes its ids (:func:`tokenise_answers`). An answer whose text holds a replacement
        character (tokens that are not whole UTF-8 characters, decoded lossily) is not taken: its text does not
        tokenise back to what the model said, so the worker answers that anchor with the model itself."""
        if "\ufffd" not in generation.text:
            self.answer, self.finished = generation.text, generation.finish_reason == "stop"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class AnchorSelection:
    """The anchors of one update and how many each source gave."""

    anchors: list[Anchor] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for anchor in self.anchors:
            out[anchor.source] = out.get(anchor.source, 0) + 1
        return out


def prompt_key(messages: Sequence[dict[str, Any]]) -> str:
    """What makes two prompts the same for anchoring: the normalised text of the last user turn."""
    return normalise(_last_user(messages))


def load_probe_prompts(path: str | Path = BUILTIN_ANCHOR_PROBE) -> list[Messages]:
    """The ``prompt`` of every row of a probe JSONL file, as single-turn conversations."""
    prompts = []
    for number, row in read_jsonl(path):
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{path}:{number}: expected a non-empty string `prompt`")
        prompts.append([{"role": "user", "content": prompt}])
    return prompts


def select_anchors(
    store: Store | None,
    settings: AnchorsConfig,
    *,
    protected: Sequence[Messages] = (),
    exclude: Iterable[Sequence[dict[str, Any]]] = (),
    min_positive_score: float = 1.0,
    examples: int | None = None,
) -> AnchorSelection:
    """Choose up to ``settings.count`` anchor prompts from ``settings.sources``, in order (more for a large update:
    :meth:`~runtime.config.AnchorsConfig.count_for`).

    Args:
        store: the interaction log (source ``log``); ``None`` skips that source.
        settings: the ``learning.anchors`` section.
        protected: the policy's protected conversations (source ``protected``).
        exclude: conversations the new signals are about; no anchor asks the same thing.
        min_positive_score: ratings at or above this are positive (``log`` takes those first).
        examples: how many examples the update trains on (new and replayed); past ``count / per_example`` the
            count grows with it and the probe is taken in ``large_update_order``. ``None``: ``count``.
    """
    selection = AnchorSelection()
    if not settings.enabled:
        return selection
    count, probe_order = settings.count_for(examples), settings.order_for(examples)
    exclude = [list(m) for m in exclude]
    taken = {prompt_key(m) for m in exclude}
    taken.discard("")
    for source in settings.sources:
        if len(selection.anchors) >= count:
            break
        if source == "log":
            candidates = _log_prompts(store, settings, min_positive_score) if store is not None else []
        elif source == "protected":
            candidates = [list(m) for m in protected]
        else:
            order = PROBE_ORDERS[probe_order]
            candidates = order(load_probe_prompts(settings.probe_file or BUILTIN_ANCHOR_PROBE), exclude)
        for messages in candidates:
            if len(selection.anchors) >= count:
                break
            key = prompt_key(messages)
            if not key or key in taken:
                selection.skipped[source] = selection.skipped.get(source, 0) + 1
                continue
            taken.add(key)
            selection.anchors.append(Anchor(messages=[dict(m) for m in messages], source=source))
    return selection


def nearest_first(prompts: list[Messages], asked: Sequence[Sequence[dict[str, Any]]]) -> list[Messages]:
    """`prompts` ordered so that every asked prompt's neighbourhood is covered: the closest prompt to each asked
    prompt in turn (by content-word overlap), then the second closest to each, and so on; prompts close to none
    follow in file order.

    With one asked prompt this is simply closest first. With many (a 16-fact update of eight kinds), no kind
    takes every anchor: each new example gets the anchors nearest to it, which are the prompts its update
    bleeds into.
    """
    return [prompts[i] for i in _nearest_order(_closeness(prompts, asked), len(prompts))]


def farthest_first(prompts: list[Messages], asked: Sequence[Sequence[dict[str, Any]]]) -> list[Messages]:
    """`prompts` ordered from the least to the most related to any asked prompt (the highest content-word overlap
    with one of them), ties in file order: anchors away from what the update teaches."""
    return [prompts[i] for i in _farthest_order(_closeness(prompts, asked), len(prompts))]


def mixed_first(prompts: list[Messages], asked: Sequence[Sequence[dict[str, Any]]]) -> list[Messages]:
    """One of :func:`nearest_first` and one of :func:`farthest_first` in turn (nearest first), each prompt once:
    half the anchors guard the neighbourhood of the new examples, half keep the breadth of what the model does."""
    scores = _closeness(prompts, asked)
    near, far = _nearest_order(scores, len(prompts)), _farthest_order(scores, len(prompts))
    order = dict.fromkeys(i for pair in zip(near, far, strict=True) for i in pair)
    return [prompts[i] for i in order]


PROBE_ORDERS = {"nearest": nearest_first, "farthest": farthest_first, "mixed": mixed_first}
"""``learning.anchors.probe_order``: how the ``probe`` source orders its prompts."""


def _nearest_order(scores: list[list[float]], count: int) -> list[int]:
    rankings = [sorted((i for i, c in enumerate(row) if c > 0), key=row.__getitem__, reverse=True) for row in scores]
    taken_in_turn = dict.fromkeys(i for depth in zip_longest(*rankings) for i in depth if i is not None)
    return [*taken_in_turn, *(i for i in range(count) if i not in taken_in_turn)]


def _farthest_order(scores: list[list[float]], count: int) -> list[int]:
    closest = [max((row[i] for row in scores), default=0.0) for i in range(count)]
    return sorted(range(count), key=closest.__getitem__)


def _closeness(prompts: list[Messages], asked: Sequence[Sequence[dict[str, Any]]]) -> list[list[float]]:
    """For each asked prompt, the content-word overlap (Jaccard) of each of `prompts` with it."""
    topics = [content_words(_last_user(m)) for m in asked]
    words = [content_words(_last_user(m)) for m in prompts]
    return [
        [len(w & topic) / len(w | topic) if w | topic else 0.0 for w in words]
        for topic in topics
    ]


def _last_user(messages: Sequence[dict[str, Any]]) -> str:
    return next((str(m.get("content") or "") for m in reversed(messages) if m.get("role") == "user"), "")


def repair_anchors(
    prompts: Sequence[Messages], existing: Sequence[Anchor], exclude: Iterable[Sequence[dict[str, Any]]]
) -> list[Anchor]:
    """Anchors for the prompts of vetoing checks, leaving out prompts already anchored or asked by a new example."""
    taken = {prompt_key(a.messages) for a in existing} | {prompt_key(m) for m in exclude}
    out = []
    for messages in prompts:
        key = prompt_key(messages)
        if key and key not in taken:
            taken.add(key)
            out.append(Anchor(messages=[dict(m) for m in messages], source="repair"))
    return out


def _log_prompts(store: Store, settings: AnchorsConfig, min_positive_score: float) -> list[Messages]:
    """Live conversations from the log: positively rated first, then the newest; never corrected or disliked."""
    recent = store.recent_interactions(limit=settings.log_window, kind="live")
    if not recent:
        return []
    signals = store.signals(interaction_ids=[i.id for i in recent])
    liked: set[str] = set()
    disliked: set[str] = set()
    for signal in signals:
        if signal.interaction_id is None:
            continue
        if signal.kind == "correction" or (signal.kind == "rating" and (signal.rating or 0.0) < 0):
            disliked.add(signal.interaction_id)
        elif signal.kind == "rating" and (signal.rating or 0.0) >= min_positive_score:
            liked.add(signal.interaction_id)
    usable = [
        i for i in recent
        if i.id not in disliked
        and i.messages
        and i.messages[-1].get("role") == "user"
        and all(m.get("role") in ("system", "user", "assistant") and isinstance(m.get("content"), str)
                for m in i.messages)
        and sum(len(m["content"]) for m in i.messages) <= settings.max_prompt_chars
    ]
    usable.sort(key=lambda i: i.id not in liked)  # stable: liked first, each group newest first
    return [[{"role": m["role"], "content": m["content"]} for m in i.messages] for i in usable]


def answer_anchors(
    model: Any, tokenizer: Any, anchors: Sequence[Anchor], *, max_new_tokens: int, batch_size: int = 8
) -> list[Anchor]:
    """Fill in the greedy answer of `model` (the active model: base + active adapter) for anchors without one."""
    from learners.generation import generate

    todo = [a for a in anchors if a.answer_ids is None]
    if todo:
        outputs = generate(
            model, tokenizer, [a.messages for a in todo], max_new_tokens=max_new_tokens, batch_size=batch_size
        )
        for anchor, output in zip(todo, outputs, strict=True):
            anchor.answer_ids, anchor.answer, anchor.finished = output.token_ids, output.text, output.finished
    return list(anchors)


def answer_with_engine(
    engine: Engine, adapter: str | None, anchors: Sequence[Anchor], *, max_new_tokens: int
) -> list[Anchor]:
    """Fill in the greedy answer that `engine` serves with `adapter` (the active one; ``None``: the base model)
    for anchors without one, in one batched call: the text and whether it ended by itself
    (:meth:`Anchor.take_answer`). The worker writes the token ids (:func:`tokenise_answers`)."""
    todo = [a for a in anchors if not a.answered]
    if todo:
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
        generations = engine.chat([a.messages for a in todo], params, adapter=[adapter] * len(todo))
        for anchor, generation in zip(todo, generations, strict=True):
            anchor.take_answer(generation)
    return list(anchors)


def tokenise_answers(tokenizer: Any, anchors: Sequence[Anchor], *, max_new_tokens: int | None = None) -> None:
    """Write ``answer_ids`` for anchors answered as text (:func:`answer_with_engine`): the answer's tokens as the
    chat template places them after the prompt, with the end-of-turn token when the answer ended by itself.

    An answer longer than `max_new_tokens` (one written for a longer cap, such as the gate's answer to a
    protected prompt) is cut to its first `max_new_tokens` tokens, as greedy decoding with that cap would have
    written it, and is then not finished."""
    from runtime.engines.torch_setup import eos_token_ids

    ends = eos_token_ids(None, tokenizer)
    for anchor in anchors:
        if anchor.answer_ids is not None or anchor.answer is None:
            continue
        full, start = encode_chat_answer(tokenizer, anchor.messages, anchor.answer)
        ids = full[start:]
        end = next((i for i, t in enumerate(ids) if t in ends), None)
        if end is not None:
            ids = ids[: end + 1] if anchor.finished else ids[:end]
        if max_new_tokens is not None and len(ids) > max_new_tokens:
            ids, anchor.finished = ids[:max_new_tokens], False
            anchor.answer = tokenizer.decode(ids, skip_special_tokens=True)
        anchor.answer_ids = ids
