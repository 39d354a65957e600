"""The policy gate: a candidate adapter is evaluated beside the active one and vetoed if it breaks anything.

The candidate is loaded into the engine under its own name but not made active, so nothing is served by
it while it is judged. Then, on the same engine, with greedy decoding:

- **protected behaviours**: each prompt is answered by the active adapter and by the candidate; a
  behaviour that passes on the active adapter and fails on the candidate is a veto (one that already
  fails on the active adapter is recorded, not held against the candidate). All prompts go to the engine in one
  batched call (per answer length), which decodes them together; the active adapter's answers are kept for the
  next candidate judged against it (a repair attempt);
- **retention suites**: the candidate may lose at most ``max_drop`` points against the active adapter;
- **target checks**: the candidate must now give the taught answers (``min_pass_rate`` of the new examples);
- **conflicts**: a taught answer must not contradict a protected behaviour. A new example conflicts with a
  behaviour when it asks about the same thing (at least half of its prompt's content words are in the
  protected prompt), the active model's own answer to it meets the behaviour's expectation, and the taught
  answer does not ("What is 10+10?" taught as "21" against a protected "20"). A JSON expectation counts for
  what it says of any prompt like its own: the answer is JSON (a taught prose answer to "Reply only with a JSON
  object..." conflicts with a protected JSON format, whatever keys the protected prompt asks for). This holds
  whatever the candidate learned, so anchors and repair cannot argue it away.

Every check's result goes into the decision's ``checks`` (stored in ``policy_decisions``). A vetoed
candidate is unloaded again; an approved one stays loaded, ready to be activated at once. A veto by protected
or retention checks alone comes with the failing prompts (``GateDecision.repair_prompts``) for gate-guided
repair; a target or conflict veto does not (the update did not learn, or it must not).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

from learners.datasets import DatasetBuild
from learners.evaluation import ask, load_questions
from policies.checks import check_answer
from policies.decision import GateDecision
from policies.schema import Expectation, Policy, ProtectedBehaviour, RetentionSuite
from runtime.engines import Engine, Generation, SamplingParams
from runtime.store import AdapterRecord
from runtime.textmatch import content_words, gives_taught_answer, normalise

REPAIRABLE_KINDS = frozenset({"protected", "retention"})
"""Check kinds whose vetoes gate-guided repair may address."""

CONFLICT_MIN_OVERLAP = 0.5
"""Share of a taught prompt's content words that must occur in a protected prompt for the two to ask the same."""


@dataclass
class CheckResult:
    """One check of the gate, on the active adapter and on the candidate."""

    kind: str
    """``protected``, ``retention``, ``target`` or ``conflict``."""
    name: str
    passed: bool
    """Whether the candidate passed."""
    veto: bool
    """Whether this check vetoes the candidate."""
    detail: str
    active: dict[str, Any] = field(default_factory=dict)
    candidate: dict[str, Any] = field(default_factory=dict)
    repair_prompts: list[list[dict[str, str]]] = field(default_factory=list)
    """For a repairable veto: the prompts that failed (not stored with the decision)."""


class PolicyGate:
    """Judges candidates by `policy` on `engine` (usually the serving engine, where it is loaded beside the
    active adapter). Call it with ``(candidate, build)``; it returns a :class:`~orchestration.cycle.GateDecision`.
    """

    def __init__(self, policy: Policy, engine: Engine, *, repair_prompts_per_check: int = 4,
                 load: Callable[[Engine, AdapterRecord], None] | None = None) -> None:
        self.policy = policy
        self.engine = engine
        # How a candidate gets into the engine: the registry's `load_into` (checksum verified, fetched from shared
        # storage, sent to replicas by location); plain `engine.load_adapter(name, path)` without a registry.
        self._load = load or (lambda engine, record: engine.load_adapter(record.name, record.path))
        self.repair_prompts_per_check = repair_prompts_per_check
        if any(b.expect.max_kl_to_base is not None for b in policy.protected) and not hasattr(
            engine, "kl_divergence"
        ):
            raise ValueError(
                f"the policy uses max_kl_to_base, which needs token distributions that {type(engine).__name__} "
                "cannot give; remove it or use the transformers engine"
            )
        self._retention_cache: dict[tuple[str, str | None, str | None], list[float]] = {}
        self._active_answers: dict[tuple[str, int, str | None], Generation] = {}

    def __call__(self, candidate: AdapterRecord, build: DatasetBuild,
                 on_check: Callable[[int, int], None] | None = None) -> GateDecision:
        """Judge `candidate`; ``on_check(done, total)`` is told as each check finishes."""
        loaded_here = not self.engine.has_adapter(candidate.name)
        if loaded_here:
            self._load(self.engine, candidate)
        active = self.engine.active_adapter
        try:
            results = self.evaluate(candidate.name, active, build if candidate.method != "seal" else None,
                                    on_check=on_check)
        except Exception as exc:
            if loaded_here:
                self.engine.unload_adapter(candidate.name)
            reason = f"the gate could not evaluate the candidate: {type(exc).__name__}: {exc}"
            return GateDecision(False, [reason], [])
        vetoes = [r for r in results if r.veto]
        checks = [{k: v for k, v in asdict(r).items() if k != "repair_prompts"} for r in results]
        if vetoes:
            if loaded_here:
                self.engine.unload_adapter(candidate.name)
            repairable = all(r.kind in REPAIRABLE_KINDS for r in vetoes)
            prompts = [p for r in vetoes for p in r.repair_prompts] if repairable else []
            return GateDecision(False, [f"{r.kind} '{r.name}': {r.detail}" for r in vetoes], checks, prompts)
        passed = sum(r.passed for r in results)
        summary = f"all vetoing checks passed ({passed}/{len(results)} checks passed against {active or 'base'})"
        return GateDecision(True, [summary], checks)

    def evaluate(self, candidate: str, active: str | None, build: DatasetBuild | None,
                 on_check: Callable[[int, int], None] | None = None) -> list[CheckResult]:
        """Every check of the policy on `candidate` against `active` (``None`` = the base model).

        Target checks need the cycle's taught examples (`build`); a SEAL cycle learns documents and is
        judged on them by its own evaluation, so it passes ``None``. ``on_check(done, total)`` follows the
        protected behaviours, retention suites and target check as each finishes.
        """
        answers = self._protected_answers(candidate, active)
        steps: list[Callable[[], CheckResult | None]] = [
            *(partial(self._protected, b, candidate, active, answers[i]) for i, b in enumerate(self.policy.protected)),
            *(partial(self._retention, s, candidate, active) for s in self.policy.retention),
        ]
        if build is not None and self.policy.targets.enabled:
            steps.append(partial(self._target, candidate, build))
        results: list[CheckResult] = []
        for done, step in enumerate(steps, 1):
            result = step()
            if result is not None:
                results.append(result)
            if on_check is not None:
                on_check(done, len(steps))
        if build is not None:
            results += self.conflicts(build, active)
        return results

    def conflicts(self, build: DatasetBuild, active: str | None) -> list[CheckResult]:
        """The protected behaviours that a new example's taught answer contradicts (see the module docstring).

        Only behaviours that pass on the active adapter are considered, each against the new examples that ask
        the same thing; one check per contradicted behaviour, each a veto.
        """
        markers = self.policy.refusal_markers
        pairs = []
        for behaviour in self.policy.protected:
            asked = content_words(behaviour.conversation()[-1]["content"])
            expect = format_of(behaviour.expect)
            for example in build.new:
                words = content_words(example.prompt[-1]["content"])
                if words and len(words & asked) / len(words) >= CONFLICT_MIN_OVERLAP:
                    taught = check_answer(expect, example.demonstration, refusal_markers=markers)
                    if not taught.passed:
                        pairs.append((behaviour, example, taught))
        if not pairs:
            return []
        behaviours = list({id(b): b for b, _, _ in pairs}.values())
        self._ask_active(behaviours, active)
        by_prompt = {
            normalise(b.conversation()[-1]["content"]): self._active_answers[self._active_key(b, active)].text
            for b in behaviours
        }
        width = max(b.max_new_tokens for b in behaviours)
        examples = [e.prompt for _, e, _ in pairs]
        answers = self.engine.chat(examples, SamplingParams(max_new_tokens=width, temperature=0.0),
                                   adapter=[active] * len(examples))
        by_prompt |= {normalise(c[-1]["content"]): g.text for c, g in zip(examples, answers, strict=True)}
        out: dict[str, CheckResult] = {}
        for behaviour, example, taught in pairs:
            if behaviour.name in out:
                continue
            on_active = check_answer(behaviour.expect, by_prompt[normalise(behaviour.conversation()[-1]["content"])],
                                     refusal_markers=markers)
            active_answer = by_prompt[normalise(example.prompt[-1]["content"])]
            applies = check_answer(format_of(behaviour.expect), active_answer, refusal_markers=markers)
            if not (on_active.passed and applies.passed):
                continue
            question = example.prompt[-1]["content"]
            detail = (
                f"the taught answer to {question!r} ({example.demonstration!r}) {'; '.join(taught.failures)}, "
                "where the active model's own answer to it meets this protected behaviour"
            )
            out[behaviour.name] = CheckResult(
                "conflict", behaviour.name, False, True, detail,
                {"answer": active_answer, "prompt": question}, {"taught": example.demonstration},
            )
        return list(out.values())

    # --- checks ------------------------------------------------------------------------------------------

    def kept_active_answers(self, active: str | None) -> list[tuple[list[dict[str, str]], Generation]]:
        """The answers of `active` to protected prompts that the gate already holds (asked for an earlier candidate
        judged against the same active adapter), asking nothing: a repair attempt's anchors reuse them. A first
        candidate's anchors are asked of the engine instead, at the anchors' length: asked here, they would cost a
        separate decode at the protected length, where the gate asks them beside the candidate's answers in the
        same batch at almost no cost."""
        return [
            (b.conversation(), self._active_answers[key])
            for b in self.policy.protected
            if (key := self._active_key(b, active)) in self._active_answers
        ]

    @staticmethod
    def _active_key(behaviour: ProtectedBehaviour, active: str | None) -> tuple[str, int, str | None]:
        return json.dumps(behaviour.conversation()), behaviour.max_new_tokens, active

    def _forget_other_actives(self, active: str | None) -> None:
        """Answers of an adapter that is no longer active are not asked for again: drop them."""
        for key in [k for k in self._active_answers if k[2] != active]:
            del self._active_answers[key]

    def _ask_active(self, behaviours: Sequence[ProtectedBehaviour], active: str | None,
                    candidate: str | None = None) -> list[Generation]:
        """Fill the kept answers of `active` to `behaviours`; with `candidate`, also return the candidate's
        answers to them, asked in the same batched call per answer length (the engine decodes them together)."""
        self._forget_other_actives(active)
        out: list[Generation | None] = [None] * len(behaviours)
        by_width: dict[int, list[int]] = {}
        for i, behaviour in enumerate(behaviours):
            by_width.setdefault(behaviour.max_new_tokens, []).append(i)
        for width, indices in by_width.items():
            params = SamplingParams(max_new_tokens=width, temperature=0.0)
            keys = {self._active_key(behaviours[i], active): i for i in indices}  # one row per distinct prompt
            missing = [i for key, i in keys.items() if key not in self._active_answers]
            asked = indices if candidate is not None else []
            if not missing and not asked:
                continue
            rows = [behaviours[i].conversation() for i in (*missing, *asked)]
            generations = self.engine.chat(rows, params, adapter=[active] * len(missing) + [candidate] * len(asked))
            for i, generation in zip(missing, generations[: len(missing)], strict=True):
                self._active_answers[self._active_key(behaviours[i], active)] = generation
            for i, generation in zip(asked, generations[len(missing):], strict=True):
                out[i] = generation
        return [g for g in out if g is not None]

    def _protected_answers(self, candidate: str, active: str | None) -> list[tuple[str, str]]:
        """The active model's and the candidate's greedy answers to every protected prompt (the active model's
        kept from earlier candidates judged against the same active adapter: a repair, or the cycle's anchors)."""
        behaviours = self.policy.protected
        candidate_answers = self._ask_active(behaviours, active, candidate)
        return [
            (self._active_answers[self._active_key(b, active)].text, generation.text)
            for b, generation in zip(behaviours, candidate_answers, strict=True)
        ]

    def _protected(self, behaviour: ProtectedBehaviour, candidate: str, active: str | None,
                   answers: tuple[str, str]) -> CheckResult:
        conversation = behaviour.conversation()
        params = SamplingParams(max_new_tokens=behaviour.max_new_tokens, temperature=0.0)
        active_text, cand_text = answers
        markers = self.policy.refusal_markers
        on_active = check_answer(behaviour.expect, active_text, refusal_markers=markers)
        on_cand = check_answer(behaviour.expect, cand_text, refusal_markers=markers)
        active_failures, cand_failures = list(on_active.failures), list(on_cand.failures)
        active_info: dict[str, Any] = {"answer": active_text}
        cand_info: dict[str, Any] = {"answer": cand_text}
        limit = behaviour.expect.max_kl_to_base
        if limit is not None:
            base_answer = self.engine.chat([conversation], params, adapter=None)[0].text
            prompt = self.engine.render_chat(conversation)  # type: ignore[attr-defined]
            kl_active, kl_cand = (
                self.engine.kl_divergence([prompt], [base_answer], adapter=name)[0]  # type: ignore[attr-defined]
                for name in (active, candidate)
            )
            active_info["kl_to_base"], cand_info["kl_to_base"] = kl_active, kl_cand
            if kl_active > limit:
                active_failures.append(f"KL to base {kl_active:.3f} > {limit}")
            if kl_cand > limit:
                cand_failures.append(f"KL to base {kl_cand:.3f} > {limit}")
        active_info["passed"], cand_info["passed"] = not active_failures, not cand_failures
        veto = not active_failures and bool(cand_failures)
        if veto:
            detail = f"passes on the active adapter but the candidate's answer {'; '.join(cand_failures)}"
        elif active_failures and cand_failures:
            detail = f"already fails on the active adapter ({'; '.join(active_failures)}); not held against it"
        elif active_failures:
            detail = "fixed by the candidate"
        else:
            detail = "passes on both"
        return CheckResult(
            "protected", behaviour.name, not cand_failures, veto, detail, active_info, cand_info,
            [conversation] if veto else [],
        )

    def _retention(self, suite: RetentionSuite, candidate: str, active: str | None) -> CheckResult:
        items = load_questions(suite.file, suite.questions)
        if not items:
            return CheckResult("retention", suite.name, False, True, f"{suite.file} holds no questions")
        key = (suite.name, suite.file, active)
        if key not in self._retention_cache:
            self._retention_cache[key] = self._score(suite, items, active)
        before_items, after_items = self._retention_cache[key], self._score(suite, items, candidate)
        before, after = _percent(before_items), _percent(after_items)
        drop = before - after
        veto = drop > suite.max_drop
        regressed = [
            it.messages(with_context=suite.with_context)
            for it, was, now in zip(items, before_items, after_items, strict=True)
            if now < was
        ]
        detail = (
            f"{suite.metric} {before:.1f} -> {after:.1f} ({-drop:+.1f} points, limit -{suite.max_drop:g}) "
            f"on {len(items)} questions"
        )
        return CheckResult(
            "retention", suite.name, not veto, veto, detail, {suite.metric: before},
            {suite.metric: after, "regressed": len(regressed)},
            regressed[: self.repair_prompts_per_check] if veto else [],
        )

    def _score(self, suite: RetentionSuite, items: list[Any], adapter: str | None) -> list[float]:
        """Per question: 1/0 (``accuracy``) or token F1 (``f1``)."""
        answers = ask(
            self.engine,  # type: ignore[arg-type]
            [it.messages(with_context=suite.with_context) for it in items],
            [it.answer for it in items],
            adapter,
            max_new_tokens=suite.max_new_tokens,
        )
        return [float(c) for c in answers.correct] if suite.metric == "accuracy" else list(answers.f1)

    def _target(self, candidate: str, build: DatasetBuild) -> CheckResult | None:
        settings = self.policy.targets
        if not settings.enabled:
            return None
        examples = build.new[: settings.max_examples]
        if not examples:
            return None
        params = SamplingParams(max_new_tokens=settings.max_new_tokens, temperature=0.0)
        answers = self.engine.chat([e.prompt for e in examples], params, adapter=candidate)
        min_score = settings.min_f1 if settings.metric == "f1" else settings.min_recall
        passes = [
            gives_taught_answer(settings.metric, gen.text, example.demonstration, example.prompt, min_score)
            for example, gen in zip(examples, answers, strict=True)
        ]
        rate = sum(passes) / len(passes)
        veto = rate < settings.min_pass_rate
        detail = (
            f"{sum(passes)}/{len(passes)} taught answers given ({100 * rate:.0f}%, "
            f"needed {100 * settings.min_pass_rate:.0f}%)"
        )
        failing = [
            {"prompt": e.prompt[-1]["content"], "expected": e.demonstration, "answer": g.text}
            for e, g, ok in zip(examples, answers, passes, strict=True)
            if not ok
        ][:5]
        return CheckResult(
            "target", "taught answers", not veto, veto, detail, {}, {"pass_rate": rate, "failing": failing}
        )


def format_of(expect: Expectation) -> Expectation:
    """What an expectation asks of any prompt like its own: a JSON expectation asks for JSON (whatever keys or
    schema that one prompt wants), the others ask what they ask (a refusal, a fact)."""
    if expect.json_keys is None and expect.json_schema is None:
        return expect
    return Expectation(json_schema={})


def _percent(scores: list[float]) -> float:
    return 100.0 * sum(scores) / len(scores) if scores else 0.0
