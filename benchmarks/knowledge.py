"""Knowledge incorporation with SEAL: no-context QA on held-out passages after a LoRA update per passage.

The passages are split: the first ``--eval-passages`` are the EVAL passages, the next ``--train-passages`` the
TRAIN passages. ReST-EM runs on the TRAIN passages only (k self-edits per passage and round, each rewarded by
the gain of its own temporary LoRA on that passage's questions). Every condition is then measured on the EVAL
passages the same way: for each passage, a fresh LoRA on the base model is trained on the condition's
sequences (``SEALSettings.inner_training``), and the passage's questions are asked WITHOUT the passage:

- ``base``: no update;
- ``passage_only``: the passage alone;
- ``base_self_edits``: one self-edit of the base model (no selection) + the passage;
- ``seal_round_<r>``: one self-edit of the generator after ReST-EM round r + the passage.

Accuracy is normalised answer containment and token F1 (``runtime.textmatch``), greedy answers, in percent
over all eval questions. ``sec_per_self_edit_eval`` is the mean wall-clock of one inner-loop evaluation
(train a temporary LoRA + answer tau) during ReST-EM.

    python benchmarks/knowledge.py --data ../shared/data/squad_knowledge_dev.jsonl \
        --set inner_training.num_epochs=5                    # as committed: ~70 min on one CPU core
    python benchmarks/knowledge.py --data ../shared/data/squad_knowledge_dev.jsonl --fast   # a few minutes
    python benchmarks/knowledge.py --data ../shared/data/squad_knowledge_dev.jsonl --rescore results/knowledge.json

Each step of the ordering also gets a paired comparison over the same questions (how many only the first
condition answers, how many only the second, and an exact two-sided sign-test p-value), because a step of one
or two questions is within noise at this size. ``--rescore`` recomputes the orderings, the paired comparisons
and the table of an earlier result from its stored answers, training nothing.

Writes benchmarks/results/knowledge.json (or --out). Input: JSONL rows with ``id``, ``title``, ``context`` and
``questions: [{question, answer}]`` (the format of squad_knowledge_dev.jsonl).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.overrides import parse_overrides  # noqa: E402
from learners.seal_config import SEALSettings, seal_settings_from_dict  # noqa: E402
from learners.seal_edits import format_prompt  # noqa: E402
from learners.seal_inner import (  # noqa: E402
    TauScore,
    evaluate_candidate,
    make_candidate,
    passage_candidate,
    sample_self_edits,
    score_tau,
)
from learners.seal_questions import QAPair  # noqa: E402
from learners.seal_restem import GENERATOR_ADAPTER, SearchDocument, run_rest_em  # noqa: E402
from learners.settings_errors import SettingsError  # noqa: E402
from runtime.engines import TransformersEngine  # noqa: E402
from runtime.jsonl import JSONLError, read_jsonl  # noqa: E402
from runtime.textmatch import contains_answer  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "squad_knowledge_dev.jsonl"
RESULTS = ROOT / "benchmarks" / "results"

FULL = {"train_passages": 12, "eval_passages": 8, "questions": 6, "k": 3, "rounds": 2}
FAST = {"train_passages": 2, "eval_passages": 2, "questions": 4, "k": 2, "rounds": 1, "max_self_edit_tokens": 160}


@dataclasses.dataclass
class Passage:
    id: str
    title: str | None
    context: str
    pairs: list[QAPair]


def load_passages(path: str | Path, questions: int | None = None) -> list[Passage]:
    """Rows of a passages JSONL file; ``questions`` keeps the first N questions of each."""
    out = []
    try:
        for n, row in read_jsonl(path):
            try:
                pairs = [QAPair(q["question"], q["answer"]) for q in row["questions"]]
                out.append(Passage(str(row.get("id", n)), row.get("title"), row["context"], pairs[:questions]))
            except (KeyError, TypeError) as exc:
                raise SystemExit(f"{path}:{n}: not a passage row ({exc})") from None
    except JSONLError as exc:
        raise SystemExit(str(exc)) from None
    return [p for p in out if p.pairs]


def _log(msg: str) -> None:
    print(f"[knowledge {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _pct(x: float) -> float:
    return round(100.0 * x, 2)


def _aggregate(per_passage: list[dict[str, Any]]) -> dict[str, Any]:
    n = sum(p["questions"] for p in per_passage)
    contain = sum(p["containment"] * p["questions"] for p in per_passage)
    f1 = sum(p["f1"] * p["questions"] for p in per_passage)
    return {
        "containment": _pct(contain / n) if n else 0.0,
        "f1": _pct(f1 / n) if n else 0.0,
        "correct": round(contain),
        "questions": n,
        "per_passage": per_passage,
    }


def _entry(p: Passage, score: TauScore, **extra: Any) -> dict[str, Any]:
    return {
        "id": p.id,
        "questions": len(p.pairs),
        "containment": score.containment,
        "f1": score.f1,
        "logprob": round(score.logprob, 4),
        "responses": score.responses,
        **extra,
    }


def measure_condition(
    engine: TransformersEngine,
    passages: list[Passage],
    settings: SEALSettings,
    baselines: dict[str, TauScore],
    work_dir: Path,
    *,
    generator: str | None,
    eval_temperature: float,
    passage_only: bool = False,
    name: str = "",
) -> dict[str, Any]:
    """Per eval passage: a self-edit (or the passage alone), a fresh LoRA on it, tau without the passage."""
    per_passage = []
    for i, p in enumerate(passages):
        if passage_only:
            cand = passage_candidate(p.id, p.context, p.title)
        else:
            prompt = format_prompt(settings.format, p.context, p.title, settings.templates)
            [raw] = sample_self_edits(engine, prompt, settings, adapter=generator, seed=settings.seed + 7919 + i,
                                      k=1, temperature=eval_temperature)
            cand = make_candidate(p.id, p.context, p.title, raw, settings, round=0, index=0)
        evaluate_candidate(engine, engine.model_path, cand, p.pairs, settings, baseline=baselines[p.id],
                           parent_adapter_dir=None, work_dir=work_dir)
        score = TauScore(cand.score["containment"], cand.score["f1"], cand.score["logprob"], cand.responses)
        per_passage.append(_entry(p, score, lines=cand.lines, seconds=round(cand.seconds, 1)))
        _log(f"{name} {p.id}: {len(cand.lines)} lines, containment {score.containment:.2f}, f1 {score.f1:.3f} "
             f"({cand.seconds:.0f}s)")
    return _aggregate(per_passage)


def _source_state() -> dict[str, Any]:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "learners", "benchmarks/knowledge.py"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.split("\n")
        return {"commit": commit, "modified": sorted(line[3:] for line in dirty if line.strip())}
    except (OSError, subprocess.CalledProcessError):
        return {}


def ordering(results: dict[str, Any], last_round: str | None, metric: str) -> dict[str, Any]:
    """The paper's ordering, SEAL > base self-edits > passage only > base, on ``metric``."""
    names = ([last_round] if last_round else []) + ["base_self_edits", "passage_only", "base"]
    values = [results[n][metric] for n in names]
    pairs = {f"{a} > {b}": values[i] > values[i + 1] for i, (a, b) in enumerate(zip(names, names[1:], strict=False))}
    return {"chain": " > ".join(names), "values": values, "pairs": pairs, "holds": all(pairs.values())}


def _hits(condition: dict[str, Any], passages: dict[str, Passage]) -> list[bool]:
    """Per question (in passage order): did the condition's answer contain the reference answer."""
    return [
        contains_answer(response, pair.answer)
        for entry in condition["per_passage"]
        for response, pair in zip(entry["responses"], passages[entry["id"]].pairs, strict=True)
    ]


def sign_test(first: list[bool], second: list[bool]) -> dict[str, Any]:
    """Paired comparison of two conditions on the same questions: exact two-sided sign test on the discordant ones."""
    only_first = sum(a and not b for a, b in zip(first, second, strict=True))
    only_second = sum(b and not a for a, b in zip(first, second, strict=True))
    n = only_first + only_second
    tail = sum(math.comb(n, i) for i in range(min(only_first, only_second) + 1)) / 2**n if n else 1.0
    return {"only_first": only_first, "only_second": only_second, "p_two_sided": round(min(1.0, 2 * tail), 4)}


def add_orderings(result: dict[str, Any], passages: dict[str, Passage], last_round: str | None) -> None:
    """The paper's ordering on both metrics, with a paired sign test for each step (containment)."""
    conditions = {k: v for k, v in result.items() if isinstance(v, dict) and "per_passage" in v}
    result["ordering"] = {m: ordering(conditions, last_round, m) for m in ("containment", "f1")}
    hits = {name: _hits(c, passages) for name, c in conditions.items()}
    chain = result["ordering"]["containment"]["chain"].split(" > ")
    result["ordering"]["paired_containment"] = {
        f"{a} > {b}": sign_test(hits[a], hits[b]) for a, b in zip(chain, chain[1:], strict=False)
    }


def rescore(path: Path, data: Path) -> dict[str, Any]:
    """Recompute the orderings, paired comparisons and table of an earlier result from its stored answers."""
    result = json.loads(path.read_text(encoding="utf-8"))
    passages = {p.id: p for p in load_passages(data, result["config"]["questions_per_passage"])}
    missing = sorted({e["id"] for e in result["base"]["per_passage"]} - set(passages))
    if missing:
        raise SystemExit(f"{data}: passages {', '.join(missing)} of {path} are not in this file; pass its --data")
    rounds = sorted((k for k in result if k.startswith("seal_round_")), key=lambda k: int(k.rsplit("_", 1)[1]))
    add_orderings(result, passages, rounds[-1] if rounds else None)
    path.write_text(json.dumps(result, indent=2) + "\n")
    table = markdown_table(result)
    path.with_suffix(".md").write_text(table)
    print(table)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="passages JSONL (squad_knowledge_dev format)")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="alias or local model directory")
    parser.add_argument("--fast", action="store_true", help=f"a few minutes: {FAST}")
    parser.add_argument("--train-passages", type=int, help=f"ReST-EM passages (default {FULL['train_passages']})")
    parser.add_argument("--eval-passages", type=int, help=f"held-out passages (default {FULL['eval_passages']})")
    parser.add_argument("--questions", type=int, help=f"first N questions per passage (default {FULL['questions']})")
    parser.add_argument("--k", type=int, help=f"self-edits per passage and round (default {FULL['k']})")
    parser.add_argument("--rounds", type=int, help=f"ReST-EM rounds R (default {FULL['rounds']})")
    parser.add_argument("--eval-temperature", type=float, default=0.0,
                        help="decoding of the one self-edit per eval passage (0: greedy)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="SEALSettings override, e.g. reward_metric=containment or inner_training.num_epochs=5")
    parser.add_argument("--out", type=Path, default=RESULTS / "knowledge.json")
    parser.add_argument("--rescore", type=Path, metavar="RESULT_JSON",
                        help="train nothing: recompute orderings, paired tests and the table of this result")
    args = parser.parse_args(argv)
    if args.rescore:
        return rescore(args.rescore, args.data)

    size = {**FULL, **(FAST if args.fast else {})}
    for key in ("train_passages", "eval_passages", "questions", "k", "rounds"):
        if getattr(args, key) is not None:
            size[key] = getattr(args, key)
    if args.threads < 1:
        raise SystemExit("--threads must be >= 1")
    torch.set_num_threads(args.threads)
    overrides = parse_overrides(args.set)
    base_settings: dict[str, Any] = {
        "num_self_edits": size["k"],
        "rounds": size["rounds"],
        "seed": args.seed,
        # Measured separately on the eval passages; on the train passages only when selection needs it.
        "passage_only_candidate": overrides.get("selection_baseline") == "passage_only",
    }
    if "max_self_edit_tokens" in size:
        base_settings["max_self_edit_tokens"] = size["max_self_edit_tokens"]
    try:
        settings = seal_settings_from_dict({**base_settings, **overrides})
    except SettingsError as exc:
        raise SystemExit(f"--set: {exc}") from None
    for train in (settings.inner_training, settings.generator_training):
        train.torch_threads = args.threads

    passages = load_passages(args.data, size["questions"] or None)
    eval_set = passages[: size["eval_passages"]]
    train_set = passages[size["eval_passages"] : size["eval_passages"] + size["train_passages"]]
    if not eval_set or (size["rounds"] and not train_set):
        raise SystemExit(f"{args.data}: {len(passages)} passages with questions; need eval and train passages")

    wall = time.perf_counter()
    _log(f"{len(train_set)} train / {len(eval_set)} eval passages, k={settings.num_self_edits}, "
         f"R={settings.rounds}, {args.threads} thread(s)")
    engine = TransformersEngine(args.model, num_threads=args.threads)
    results: dict[str, Any] = {}
    rounds_report: list[dict[str, Any]] = []
    eval_seconds: list[float] = []
    try:
        with tempfile.TemporaryDirectory(prefix="knowledge-") as tmp:
            work = Path(tmp)
            ev = {"max_new_tokens": settings.eval_max_new_tokens, "batch_size": settings.eval_batch_size}
            baselines = {p.id: score_tau(engine, p.pairs, None, **ev) for p in eval_set}
            results["base"] = _aggregate([_entry(p, baselines[p.id]) for p in eval_set])
            _log(f"base: {results['base']['containment']} / f1 {results['base']['f1']}")
            results["passage_only"] = measure_condition(engine, eval_set, settings, baselines, work, generator=None,
                                                        eval_temperature=0.0, passage_only=True, name="passage_only")
            results["base_self_edits"] = measure_condition(engine, eval_set, settings, baselines, work,
                                                           generator=None, eval_temperature=args.eval_temperature,
                                                           name="base_self_edits")
            generators: dict[int, str | None] = {}
            if settings.rounds:
                search = [
                    SearchDocument(p.id, p.context, p.title, p.pairs, score_tau(engine, p.pairs, None, **ev))
                    for p in train_set
                ]
                rest = run_rest_em(
                    engine, engine.model_path, search, settings, work_dir=work / "rest-em",
                    on_round=lambda r, g: generators.__setitem__(r, g), log=_log,
                )
                eval_seconds = rest.eval_seconds
                rounds_report = [r.to_dict() for r in rest.rounds]
                for report in rounds_report:
                    report.pop("generator_dir", None)
            for r in range(1, settings.rounds + 1):
                name = f"seal_round_{r}"
                if r not in generators:
                    results[name] = {"skipped": "ReST-EM stopped before this round"}
                    continue
                gen = generators[r]  # None: no round so far kept a self-edit, the base model still writes them
                if gen is not None:
                    engine.load_adapter(GENERATOR_ADAPTER, gen, replace=True)
                try:
                    results[name] = measure_condition(engine, eval_set, settings, baselines, work,
                                                      generator=GENERATOR_ADAPTER if gen else None,
                                                      eval_temperature=args.eval_temperature, name=name)
                finally:
                    if gen is not None:
                        engine.unload_adapter(GENERATOR_ADAPTER)
                results[name]["generator"] = "trained" if gen else "base model (no self-edit kept yet)"
                _log(f"{name}: {results[name]['containment']} / f1 {results[name]['f1']}")
    finally:
        engine.close()

    last = f"seal_round_{settings.rounds}" if settings.rounds and "containment" in results.get(
        f"seal_round_{settings.rounds}", {}) else None
    result: dict[str, Any] = {
        **results,
        "sec_per_self_edit_eval": round(sum(eval_seconds) / len(eval_seconds), 2) if eval_seconds else None,
        "rest_em_rounds": rounds_report,
        "summary": {
            name: {"containment": r["containment"], "f1": r["f1"], "correct": r["correct"],
                   "questions": r["questions"]}
            for name, r in results.items() if "containment" in r
        },
        "wall_seconds": round(time.perf_counter() - wall, 1),
        "config": {
            "model": args.model,
            "data": str(args.data),
            "fast": args.fast,
            "train_passages": [p.id for p in train_set],
            "eval_passages": [p.id for p in eval_set],
            "questions_per_passage": size["questions"],
            "eval_temperature": args.eval_temperature,
            "threads": args.threads,
            "seed": args.seed,
            "overrides": overrides,
            "settings": settings.to_dict(),
            "units": "accuracies in percent of all eval questions (normalised answer containment; token F1)",
            "machine": f"{platform.machine()} {platform.system()}, torch {torch.__version__}",
            "source": _source_state(),
        },
    }
    add_orderings(result, {p.id: p for p in eval_set}, last)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"{'condition':<18} {'containment %':>14} {'F1 %':>8} {'correct':>9}"]
    for name, r in result["summary"].items():
        lines.append(f"{name:<18} {r['containment']:>14.1f} {r['f1']:>8.1f} {r['correct']:>5}/{r['questions']}")
    lines.append(f"sec_per_self_edit_eval {result['sec_per_self_edit_eval']}; ordering (containment) "
                 f"{result['ordering']['containment']['chain']}: {result['ordering']['containment']['holds']}; "
                 f"wall {result['wall_seconds']:.0f} s")
    print("\n".join(lines))
    args.out.with_suffix(".md").write_text(markdown_table(result))
    return result


def markdown_table(result: dict[str, Any]) -> str:
    """The short markdown summary written beside the JSON."""
    rows = ["| condition | containment % | F1 % | correct |", "|---|---|---|---|"]
    for name, r in result["summary"].items():
        rows.append(f"| {name} | {r['containment']:.1f} | {r['f1']:.1f} | {r['correct']}/{r['questions']} |")
    rows.append("")
    for metric in ("containment", "f1"):
        order = result["ordering"][metric]
        failed = [pair for pair, ok in order["pairs"].items() if not ok]
        verdict = "holds" if order["holds"] else f"does not hold (fails at {'; '.join(failed)})"
        rows.append(f"- Ordering on {metric}: {order['chain']}: {verdict}.")
    paired = result["ordering"].get("paired_containment", {})
    if paired:
        rows.append("- Paired, per question (containment): " + "; ".join(
            f"{pair}: {t['only_first']} vs {t['only_second']} answered by one only, p={t['p_two_sided']:g}"
            for pair, t in paired.items()) + ".")
    rows.append(f"- sec_per_self_edit_eval {result['sec_per_self_edit_eval']}; wall {result['wall_seconds']:.0f} s.")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    main()
