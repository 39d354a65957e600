"""SEAL (Zweiger et al., 2025): new documents become knowledge in the weights through the model's own self-edits.

One update (:func:`run_seal_update`, run inside the learner's worker process):

1. **tau**: each document's supplied question/answer pairs, or pairs the model writes whose answer is in the
   document (:func:`prepare_questions`); the no-update baseline is measured on tau without the document;
2. **inner loop**: per document and round, k self-edits are sampled from the self-edit generator, each is
   trained as a temporary LoRA (self-edit lines + the passage, plain-text SFT) and rewarded by its gain on tau
   (:mod:`learners.seal_inner`);
3. **ReST-EM**: the best self-edit per document (or every one beating the baseline) trains the generator, a
   LoRA of its own on the base model, for R rounds (:mod:`learners.seal_restem`);
4. **knowledge update**: the kept self-edits train the serving candidate, continuing from the active adapter,
   with replay. It is written to ``output_dir`` (a staging directory: publishing is the caller's step).

Modules: :mod:`learners.seal_edits` (templates, parsing), :mod:`learners.seal_questions` (tau),
:mod:`learners.seal_config` (:class:`SEALSettings`), :mod:`learners.seal_inner`, :mod:`learners.seal_restem`.
"""

from __future__ import annotations

import random
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runtime.chat_encoding import encode_chat

from .callbacks import ProgressFn
from .examples import DemoExample, TrainingText
from .seal_config import SealDocument, SEALSettings, seal_settings_from_dict
from .seal_edits import passage_text
from .seal_inner import Deadline, score_tau
from .seal_questions import QAPair, QuestionSettings, prepare_questions, prepare_tau
from .seal_restem import RestEmResult, SearchDocument, run_rest_em, select_self_edits, selection_thresholds

if TYPE_CHECKING:
    from .anchor_loss import AnchorTraining

__all__ = [
    "QAPair",
    "QuestionSettings",
    "SEALSettings",
    "SealDocument",
    "SealResult",
    "documents_from_store",
    "prepare_questions",
    "replay_passages",
    "run_seal_update",
    "seal_settings_from_dict",
]

PARENT_ADAPTER = "seal-parent"
"""Name of the active (serving) adapter inside the learner's engine while the update runs."""


@dataclass
class SealResult:
    """What one SEAL update produced.

    Attributes:
        adapter_dir: The serving candidate (``output_dir``), or ``None`` when no document was used.
        generator_adapter_dir: The new self-edit generator (``generator_output_dir``), or ``None`` when no round
            kept a self-edit (the previous generator stays current).
        used_document_ids: Documents trained into the candidate (mark these consumed once it is published).
        skipped_documents: Document id -> why it was not used (left for a later cycle).
        documents: Per document: tau source and size, pairs dropped, baseline, best reward, what was chosen.
        rounds: Per ReST-EM round: self-edits scored, kept, generator examples, mean reward.
        metrics: Timings and totals (``sec_per_self_edit_eval``, ``search_seconds``, ``update_train_seconds``, ...).
        update_texts: The sequences the candidate was trained on (kept self-edits, passages, replay): a repair of
            a vetoed candidate trains on them again without repeating the search.
    """

    adapter_dir: str | None
    generator_adapter_dir: str | None
    used_document_ids: list[str]
    skipped_documents: dict[str, str]
    documents: list[dict[str, Any]] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    update_texts: list[TrainingText] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def run_seal_update(
    base_model_dir: str | Path,
    documents: Sequence[SealDocument],
    settings: SEALSettings | Mapping[str, Any] | None = None,
    *,
    output_dir: str | Path,
    generator_output_dir: str | Path,
    parent_adapter_dir: str | Path | None = None,
    generator_adapter_dir: str | Path | None = None,
    replay_examples: Sequence[DemoExample | Mapping[str, Any] | str] = (),
    progress: ProgressFn | None = None,
    engine: Any = None,
    device: str = "cpu",
    num_threads: int | None = None,
    log: Callable[[str], None] | None = None,
    anchors: AnchorTraining | None = None,
) -> SealResult:
    """Run one SEAL update on ``documents`` and write the serving candidate and the new generator.

    Args:
        base_model_dir: Local model directory (``runtime.models.resolve_model``).
        documents: The new documents (``SealDocument.from_store(doc)`` for store rows).
        settings: :class:`SEALSettings`, or the YAML mapping (read with :func:`seal_settings_from_dict`).
        output_dir: Where the serving candidate is written (e.g. ``registry.staging_dir(run_id) / "adapter"``).
        generator_output_dir: Where the new generator is written; must differ from ``output_dir``.
        parent_adapter_dir: The active serving adapter: the baseline is measured on it, temporary adapters and
            the candidate continue from it (``None``: the base model, fresh ``settings.lora`` adapters).
        generator_adapter_dir: The current self-edit generator (``None``: the base model writes self-edits and
            the first round trains a fresh ``settings.generator_lora`` adapter).
        replay_examples: Earlier data mixed into the candidate's training: plain texts (e.g. earlier documents'
            passages) or demonstrations (``DemoExample`` or its dict), rendered with the chat template.
        progress: ``fn(step, total, logs)``: during the search step counts scored self-edits (logs ``round``,
            ``reward``, ``phase`` 1); during the candidate's training the trainer's steps (``phase`` 2).
        engine: An engine on the same base model to evaluate with (default: a ``TransformersEngine`` on
            ``device`` with ``num_threads``, closed at the end). Adapters it already holds are left alone.
        log: Receives one line per scored self-edit and per round.
        anchors: Anchors answered by the active model; the candidate's training adds the anchor term.

    Temporary adapters and generator rounds live in a scratch directory beside ``output_dir`` that is removed
    at the end, also on failure.
    """
    if not isinstance(settings, SEALSettings):
        settings = seal_settings_from_dict(settings)
    output_dir, generator_output_dir = Path(output_dir), Path(generator_output_dir)
    if output_dir.resolve() == generator_output_dir.resolve():
        raise ValueError("generator_output_dir must differ from output_dir: the generator is a separate adapter")
    if parent_adapter_dir and generator_adapter_dir and Path(parent_adapter_dir).resolve() == Path(
        generator_adapter_dir
    ).resolve():
        raise ValueError("generator_adapter_dir is the serving adapter; the generator must be a separate adapter")
    deadline = Deadline(settings.time_budget_s)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="seal-scratch-", dir=output_dir.parent))
    own_engine = engine is None
    if engine is None:
        from runtime.engines import TransformersEngine

        engine = TransformersEngine(base_model_dir, device=device, num_threads=num_threads)
    loaded_parent = False
    try:
        if parent_adapter_dir:
            engine.load_adapter(PARENT_ADAPTER, parent_adapter_dir, replace=True)
            loaded_parent = True
        parent_name = PARENT_ADAPTER if parent_adapter_dir else None
        reports, search_docs, skipped = _prepare(engine, documents, settings, parent_name, deadline)
        search_start = time.perf_counter()
        search = run_rest_em(
            engine, base_model_dir, search_docs, settings, work_dir=scratch, parent_adapter_dir=parent_adapter_dir,
            generator_adapter_dir=generator_adapter_dir, deadline=deadline,
            progress=_phase(progress, 1.0), log=log,
        )
        search_seconds = time.perf_counter() - search_start
        generator_out = None
        if search.generator_dir:
            shutil.rmtree(generator_output_dir, ignore_errors=True)
            shutil.copytree(search.generator_dir, generator_output_dir)
            generator_out = str(generator_output_dir)
        texts, used = _choose(documents, settings, search, search_docs, reports, skipped)
        replay = _replay_texts(base_model_dir, replay_examples, settings)
        adapter_dir, update, update_texts = None, None, _dedupe(texts + replay) if texts else []
        if texts:
            from .sft_trainer import train_sft_texts

            update = train_sft_texts(
                base_model_dir, update_texts, output_dir, settings.update_training, settings.lora,
                parent_adapter_dir, _phase(progress, 2.0), anchors=anchors,
            )
            adapter_dir = str(output_dir)
    finally:
        if loaded_parent and engine.has_adapter(PARENT_ADAPTER):
            engine.unload_adapter(PARENT_ADAPTER)
        if own_engine:
            engine.close()
        shutil.rmtree(scratch, ignore_errors=True)
    evals = search.eval_seconds
    metrics = {
        "documents": len(documents),
        "used": len(used),
        "skipped": len(skipped),
        "self_edits_scored": sum(1 for c in search.candidates if c.source == "self_edit"),
        "sec_per_self_edit_eval": round(sum(evals) / len(evals), 2) if evals else None,
        "search_seconds": round(search_seconds, 2),
        "tau_dropped": sum(r.get("tau_dropped", 0) for r in reports.values()),
        "update_sequences": len(texts),
        "replay": len(replay),
        "update_train_seconds": round(update.train_seconds, 2) if update else None,
        "update_steps": update.num_steps if update else 0,
        "update_summary": update.summary if update else {},
        "generator_trained": generator_out is not None,
    }
    return SealResult(
        adapter_dir=adapter_dir,
        generator_adapter_dir=generator_out,
        used_document_ids=used,
        skipped_documents=skipped,
        documents=[reports[d.id] for d in documents if d.id in reports],
        rounds=[r.to_dict() for r in search.rounds],
        metrics=metrics,
        update_texts=update_texts,
    )


def _phase(progress: ProgressFn | None, phase: float) -> ProgressFn | None:
    if progress is None:
        return None
    return lambda step, total, logs: progress(step, total, {"phase": phase, **logs})


def _prepare(
    engine: Any, documents: Sequence[SealDocument], settings: SEALSettings, parent: str | None, deadline: Deadline
) -> tuple[dict[str, dict[str, Any]], list[SearchDocument], dict[str, str]]:
    """Tau and the no-update baseline of each document."""
    reports: dict[str, dict[str, Any]] = {}
    search: list[SearchDocument] = []
    skipped: dict[str, str] = {}
    seen: set[str] = set()
    for doc in documents:
        if doc.id in seen:
            raise ValueError(f"document {doc.id!r} is given twice")
        seen.add(doc.id)
        report: dict[str, Any] = {"id": doc.id, "title": doc.title}
        reports[doc.id] = report
        if deadline.expired():
            skipped[doc.id] = "time budget spent before its turn"
            report["chosen"] = None
            continue
        tau = prepare_tau(doc.text, doc.questions, engine, title=doc.title, settings=settings.questions)
        report.update(tau_source=tau.source, tau_pairs=len(tau.pairs), tau_dropped=tau.dropped)
        if tau.source == "generated":
            report["tau"] = [p.to_dict() for p in tau.pairs]
        if not tau.pairs:
            report["search"] = "no usable tau: nothing to reward self-edits with"
            continue
        baseline = score_tau(engine, tau.pairs, parent, max_new_tokens=settings.eval_max_new_tokens,
                             batch_size=settings.eval_batch_size)
        report["baseline"] = baseline.to_dict()
        search.append(SearchDocument(doc.id, doc.text, doc.title, tau.pairs, baseline))
    return reports, search, skipped


def _choose(
    documents: Sequence[SealDocument],
    settings: SEALSettings,
    search: RestEmResult,
    search_docs: list[SearchDocument],
    reports: dict[str, dict[str, Any]],
    skipped: dict[str, str],
) -> tuple[list[str], list[str]]:
    """The candidate's training texts and the documents they cover (``skipped`` gets the others)."""
    kept = select_self_edits(search.candidates, settings.selection, settings.min_gain,
                             thresholds=selection_thresholds(search.candidates, settings))
    searched = {d.id for d in search_docs}
    texts: list[str] = []
    used: list[str] = []
    for doc in documents:
        if doc.id in skipped:
            continue
        report = reports[doc.id]
        scored = [c for c in search.candidates if c.document_id == doc.id and c.reward is not None]
        if scored:
            best = max(scored, key=lambda c: (c.reward, c.gains.get("logprob", 0.0)))
            report["best_reward"] = best.reward
            report["candidates"] = [c.to_dict() for c in scored]
        if doc.id in kept:
            chosen = kept[doc.id]
            report["chosen"] = [{"source": c.source, "round": c.round, "index": c.index, "reward": c.reward}
                                for c in chosen]
            for c in chosen:
                texts.extend(c.sequences)
            used.append(doc.id)
        elif doc.id in searched and doc.id not in search.reached:
            skipped[doc.id] = "time budget spent before its self-edits were scored"
            report["chosen"] = None
        elif settings.fallback == "passage":
            texts.append(passage_text(doc.text, doc.title))
            report["chosen"] = "passage_fallback"
            used.append(doc.id)
        else:
            skipped[doc.id] = report.get("search") or "no self-edit beat the no-update baseline"
            report["chosen"] = None
    return texts, used


def _replay_texts(
    base_model_dir: str | Path, replay: Sequence[DemoExample | Mapping[str, Any] | str], settings: SEALSettings
) -> list[TrainingText]:
    items = list(replay)
    if settings.max_replay is not None and len(items) > settings.max_replay:
        items = random.Random(settings.seed).sample(items, settings.max_replay)
    texts: list[TrainingText] = []
    tokenizer = None
    for item in items:
        if isinstance(item, str):
            texts.append(item)
            continue
        example = item if isinstance(item, DemoExample) else DemoExample(**dict(item))
        if tokenizer is None:
            from .lora import load_tokenizer

            tokenizer = load_tokenizer(base_model_dir)
        messages = [*example.prompt, {"role": "assistant", "content": example.demonstration}]
        # Token ids, not the rendered string: the template's control tokens are real, the text in it is not.
        texts.append(encode_chat(tokenizer, messages, add_generation_prompt=False))
    return [t for t in texts if (t.strip() if isinstance(t, str) else t)]


def _dedupe(texts: list[TrainingText]) -> list[TrainingText]:
    """Texts (stripped) and token sequences, each once, in order."""
    seen: dict[Any, TrainingText] = {}
    for text in texts:
        if isinstance(text, str):
            text = text.strip()
            if text:
                seen.setdefault(text, text)
        elif text:
            seen.setdefault(tuple(text), list(text))
    return list(seen.values())


def documents_from_store(store: Any, *, limit: int | None = None) -> list[SealDocument]:
    """The store's unconsumed documents (oldest first) as :class:`SealDocument` rows."""
    return [SealDocument.from_store(d) for d in store.documents(unconsumed_only=True, limit=limit)]


def replay_passages(store: Any, n: int, *, seed: int = 0) -> list[str]:
    """Up to ``n`` passages of documents earlier runs consumed, sampled with ``seed`` (replay for the candidate)."""
    earlier = [passage_text(d.text, d.title) for d in store.documents(state="learned")]
    return random.Random(seed).sample(earlier, min(n, len(earlier))) if n > 0 else []
