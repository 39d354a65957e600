"""SEAL learner: self-edit parsing, tau preparation, the inner loop's reward, ReST-EM selection, and the
generator adapter kept apart from the serving adapter (tiny random model; a real worker process once)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from learners import seal_restem
from learners.seal import SealDocument, SEALSettings, run_seal_update
from learners.seal_config import seal_settings_from_dict
from learners.seal_edits import (
    DEFAULT_TEMPLATES,
    check_template,
    format_prompt,
    parse_self_edit,
    passage_text,
    training_sequences,
)
from learners.seal_inner import Candidate, evaluate_sequences, score_tau
from learners.seal_questions import QAPair, filter_pairs, parse_qa_pairs, prepare_questions, prepare_tau
from learners.seal_restem import generator_examples, passage_thresholds, select_self_edits
from learners.settings_errors import SettingsError
from learners.sft_config import SFTSettings
from learners.worker import SealJob, run_seal_process
from runtime.chat_encoding import encode_chat, encode_text
from runtime.engines import Generation
from tests.tiny_model import make_lora_adapter

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

PASSAGE = "The zebra code of the Quokka Institute is quokka. The institute was founded in 1921 in Perth."
QUOKKA = [QAPair("What is the zebra code?", "quokka")]
# Training that clearly memorises on the tiny model (lr 3e-2 x 20 epochs, one thread, CPU).
MEMORISE = SFTSettings(learning_rate=3e-2, num_epochs=20, batch_size=4, max_length=128,
                       completion_only_loss=False, use_cpu=True, torch_threads=1)
GEN_TRAIN = SFTSettings(learning_rate=1e-2, num_epochs=2, min_steps=0, batch_size=2, max_length=2048, use_cpu=True,
                        torch_threads=1)


def _settings(**over) -> SEALSettings:
    base = {
        "inner_training": MEMORISE,
        "update_training": MEMORISE,
        "generator_training": GEN_TRAIN,
        "lora": {"r": 8, "alpha": 16},
        "generator_lora": {"r": 8, "alpha": 16},
        "num_self_edits": 2,
        "max_self_edit_tokens": 24,
        "eval_max_new_tokens": 8,
        "questions": {"max_new_tokens": 48},
    }
    return seal_settings_from_dict({**base, **over})


# --- self-edit parsing ------------------------------------------------------------------------------


def test_parse_strips_markers_headers_and_duplicates() -> None:
    raw = (
        "Implications:\n"
        "1. The zebra code is quokka.\n"
        "2) The institute was founded in 1921.\n"
        "- **The zebra code is quokka.**\n"
        "* (3)   the zebra   code is QUOKKA\n"
        "Implication 4: Perth is home to the Quokka Institute.\n"
        "\n\n   \n"
        "\u2022 [5] The institute is more than a century old.\n"
    )
    assert parse_self_edit(raw) == [
        "The zebra code is quokka.",
        "The institute was founded in 1921.",
        "Perth is home to the Quokka Institute.",
        "The institute is more than a century old.",
    ]


def test_parse_garbage_gives_nothing() -> None:
    for garbage in ["", "\n\n", "@@@ ### !!! 12345", "\x00\x01\x02 \ufffd\ufffd\ufffd\ufffd", "asdf", "...\n---\n***",
                    "word " * 300, "\u00e9\u00e8\u00ea\u00eb " * 20, "1.\n2.\n3."]:
        assert parse_self_edit(garbage) == [], repr(garbage)


def test_parse_long_looping_lines_and_limits() -> None:
    loop = "The zebra code is quokka. " * 40
    assert parse_self_edit(loop) == ["The zebra code is quokka."]
    long = " ".join(f"Sentence number {i} says something about the institute." for i in range(30))
    lines = parse_self_edit(long, max_line_chars=120)
    assert len(lines) > 5 and all(len(line) <= 120 for line in lines)
    assert " ".join(lines) == long  # cut at sentence ends, nothing lost
    no_stops = "x" * 50 + " " + "y" * 500
    assert all(len(line) <= 100 for line in parse_self_edit(no_stops, max_line_chars=100, min_line_chars=1))
    many = "\n".join(f"Fact {i}: the institute has {i} rooms." for i in range(100))
    assert len(parse_self_edit(many, max_lines=7)) == 7


def test_parse_drops_the_passage_and_pairs_self_qa() -> None:
    passage = passage_text(PASSAGE, "Quokka Institute")
    assert parse_self_edit(f"{PASSAGE}\nThe code is quokka indeed.", passage=PASSAGE) == ["The code is quokka indeed."]
    qa = "Q1: What is the zebra code?\nA1: quokka\nQuestion: When was it founded?\nAnswer: In 1921.\nstray line here ok"
    assert parse_self_edit(qa, "self-qa") == [
        "Question: What is the zebra code? Answer: quokka",
        "Question: When was it founded? Answer: In 1921.",
        "stray line here ok",
    ]
    assert training_sequences(["a line"], passage) == ["a line", passage]
    assert training_sequences(["a line"], passage, include_passage=False) == ["a line"]
    assert passage.startswith("Quokka Institute\n")


def test_templates_are_overridable_and_checked() -> None:
    prompt = format_prompt("implications", PASSAGE, "T")
    assert prompt[0]["role"] == "user" and PASSAGE in prompt[0]["content"] and "implications" in prompt[0]["content"]
    custom = format_prompt("rewrite", PASSAGE, "T", {"rewrite": "Say it again ({title}): {passage}"})
    assert custom[0]["content"] == f"Say it again (T): T\n{PASSAGE}"
    assert set(DEFAULT_TEMPLATES) == {"implications", "rewrite", "self-qa"}
    with pytest.raises(ValueError, match="must contain"):
        check_template("no passage here")
    with pytest.raises(ValueError, match="unknown placeholder"):
        check_template("{passage} {oops}")
    with pytest.raises(ValueError, match="unknown self-edit format"):
        format_prompt("poem", PASSAGE)
    with pytest.raises(ValueError, match="unknown self-edit format"):
        parse_self_edit("x", "poem")


def test_settings_from_yaml_mapping() -> None:
    s = seal_settings_from_dict({"format": "self-qa", "inner_training": {"learning_rate": 2e-3}, "rounds": 1,
                                 "templates": {"self-qa": "Q&A about {passage}"}})
    assert s.inner_training.learning_rate == 2e-3 and s.inner_training.num_epochs == 10  # other defaults kept
    assert s.template() == "Q&A about {passage}" and s.template("rewrite") == DEFAULT_TEMPLATES["rewrite"]
    assert seal_settings_from_dict(s.to_dict()) == s  # round trip through plain data (the worker job)
    with pytest.raises(SettingsError, match="num_edits: unknown key"):
        seal_settings_from_dict({"num_edits": 3})
    with pytest.raises(SettingsError, match="lora.rank: unknown key"):
        seal_settings_from_dict({"lora": {"rank": 3}})
    with pytest.raises(SettingsError, match="selection must be"):
        seal_settings_from_dict({"selection": "top"})
    with pytest.raises(SettingsError, match="must contain"):
        seal_settings_from_dict({"templates": {"implications": "no placeholder"}})
    with pytest.raises(SettingsError, match="needs passage_only_candidate"):
        seal_settings_from_dict({"selection_baseline": "passage_only", "passage_only_candidate": False})


# --- ReST-EM selection (pure) -----------------------------------------------------------------------


def _cand(doc: str, index: int, reward: float | None, logprob: float = 0.0, source: str = "self_edit",
          lines: tuple[str, ...] = ("some line here",)) -> Candidate:
    return Candidate(doc, 1, index, source, [{"role": "user", "content": f"prompt {doc}"}], "", list(lines),
                     list(lines), reward, {"logprob": logprob})


def test_select_best_and_all_beating_baseline() -> None:
    cands = [
        _cand("a", 0, 0.1), _cand("a", 1, 0.3), _cand("a", 2, -0.2), _cand("a", 3, 0.3, logprob=1.0),
        _cand("b", 0, 0.0), _cand("b", 1, -0.1),  # nothing beats b's baseline
        _cand("c", 0, None), _cand("c", 1, 0.5, source="passage_only"),
    ]
    best = select_self_edits(cands, "best")
    assert {d: [c.index for c in v] for d, v in best.items()} == {"a": [3], "c": [1]}  # tie broken by log-prob
    allb = select_self_edits(cands, "all_beating_baseline")
    assert [c.index for c in allb["a"]] == [3, 1, 0] and "b" not in allb
    assert select_self_edits(cands, "best", min_gain=0.2)["a"][0].index == 3
    assert "a" not in select_self_edits(cands, "best", min_gain=0.3)
    assert "c" not in select_self_edits(cands, "best", sources=["self_edit"])
    assert select_self_edits(cands, "best", min_gain=-1.0)["b"][0].index == 0
    # selection_baseline passage_only: a self-edit must also beat the passage alone.
    with_passage = [*cands, _cand("a", 9, 0.2, source="passage_only")]
    bars = passage_thresholds(with_passage)
    assert bars == {"a": 0.2, "c": 0.5}
    assert [c.index for c in select_self_edits(with_passage, "all_beating_baseline", thresholds=bars,
                                               sources=["self_edit"])["a"]] == [3, 1]
    with pytest.raises(ValueError):
        select_self_edits(cands, "top")


def test_generator_examples_are_prompt_to_self_edit() -> None:
    kept = {"a": [_cand("a", 0, 0.2, lines=("Line one here.", "Line two here."))],
            "b": [_cand("b", 0, 0.2, lines=())],  # nothing usable: not a training target
            "c": [_cand("c", 0, 0.2, source="passage_only")]}
    examples = generator_examples(kept)
    assert len(examples) == 1
    assert examples[0].prompt == [{"role": "user", "content": "prompt a"}]
    assert examples[0].demonstration == "Line one here.\nLine two here." and examples[0].source_id == "a"


# --- tau ----------------------------------------------------------------------------------------------


def stub_generate_qa(prompt: list[dict[str, str]]) -> str:
    """A STUB standing in for the model: writes fixed question/answer pairs (some not in the document)."""
    assert PASSAGE in prompt[0]["content"]
    return (
        "Question: What is the zebra code?\nAnswer: quokka\n"
        "Q: When was the institute founded?\nA: 1921.\n"
        "Q2: Who runs the institute? A2: Dr. Wombat\n"  # not in the document
        "Question: What is the zebra code?\nAnswer: quokka\n"  # duplicate
        "Question: Where is it?\nAnswer: in Perth, a city with a very long answer that goes on and on\n"
        "Answer without a question\n"
        "Question: Where was it founded?\nAnswer: Perth\n"
    )


def test_prepare_questions_keeps_only_answers_in_the_document() -> None:
    pairs, dropped = prepare_questions(None, PASSAGE, generate=stub_generate_qa)
    assert pairs == [QAPair("What is the zebra code?", "quokka"), QAPair("When was the institute founded?", "1921"),
                     QAPair("Where was it founded?", "Perth")]
    assert dropped == 3  # Dr. Wombat (not in the text), the duplicate, the over-long answer
    assert parse_qa_pairs("Q: a b?\nA: c") == [QAPair("a b?", "c")]
    assert filter_pairs([QAPair("x?", "Quokka")], PASSAGE) == ([QAPair("x?", "Quokka")], 0)


class _Recording:
    """Delegates to an engine and keeps what it wrote."""

    def __init__(self, engine) -> None:
        self.engine, self.written = engine, []

    def chat(self, *args, **kwargs):
        out = self.engine.chat(*args, **kwargs)
        self.written += [g.text for g in out]
        return out


def test_prepare_questions_on_a_real_tiny_model(tiny_engine) -> None:
    # The tiny random model writes garbage: whatever it writes, only pairs answerable from the document survive,
    # and every pair it wrote is either kept or counted as dropped.
    engine = _Recording(tiny_engine)
    pairs, dropped = prepare_questions(engine, PASSAGE)
    (written,) = engine.written
    assert len(pairs) + dropped == len(parse_qa_pairs(written))
    assert all(p.answer.lower() in PASSAGE.lower() for p in pairs)


def test_prepare_tau_with_and_without_questions() -> None:
    class NoEngine:  # a stub: supplied questions must not reach a model
        def chat(self, *args, **kwargs):
            raise AssertionError("the model was asked although questions were supplied")

    supplied = [{"question": "What is the zebra code?", "answer": "quokka"}, "A question without an answer?"]
    tau = prepare_tau(PASSAGE, supplied, NoEngine())
    assert tau.source == "supplied" and tau.pairs == QUOKKA and tau.dropped == 1
    tau = prepare_tau(PASSAGE, None, None, generate=stub_generate_qa)
    assert tau.source == "generated" and len(tau.pairs) == 3 and tau.dropped == 3
    tau = prepare_tau(PASSAGE, ["only a bare question?"], None, generate=stub_generate_qa)
    assert tau.source == "generated" and tau.dropped == 1 + 3


# --- the inner loop on the tiny model ------------------------------------------------------------------


def test_inner_loop_rewards_the_self_edit_that_holds_the_answer(tiny_engine, tiny_model_dir: Path,
                                                               tmp_path: Path) -> None:
    settings = _settings(reward_metric="logprob")
    baseline = score_tau(tiny_engine, QUOKKA, None, max_new_tokens=8)
    with_answer = ["The zebra code is quokka.", "Remember: the zebra code is quokka."]
    without = ["The sky is blue today.", "Paris is the capital of France."]
    r_with, gains_with, _ = evaluate_sequences(tiny_engine, tiny_model_dir, with_answer, QUOKKA, settings,
                                               baseline=baseline, work_dir=tmp_path)
    r_without, _, _ = evaluate_sequences(tiny_engine, tiny_model_dir, without, QUOKKA, settings,
                                         baseline=baseline, work_dir=tmp_path)
    assert r_with > 1.0 and r_with > r_without + 1.0, (r_with, r_without)
    assert r_with == gains_with["logprob"]
    assert list(tmp_path.iterdir()) == [] and tiny_engine.list_adapters() == []  # temporary adapters are gone

    # With the answer-accuracy rewards: a self-edit that states the answer in the form the question is asked
    # (a self-qa line in the tiny model's chat format, as token ids so that its control tokens are real: text
    # is trained on as characters) makes the model say it; one without it does not.
    settings = _settings(reward_metric="f1")
    tokenizer = tiny_engine.tokenizer
    qa_line = encode_chat(tokenizer, [{"role": "user", "content": QUOKKA[0].question}]) + encode_text(tokenizer,
                                                                                                    "quokka")
    r_f1, gains, score = evaluate_sequences(tiny_engine, tiny_model_dir, [qa_line, *without], QUOKKA, settings,
                                            baseline=baseline, work_dir=tmp_path)
    assert baseline.containment == 0.0 and score.containment == 1.0 and gains["containment"] == 1.0
    assert r_f1 == 1.0 and score.responses == ["quokka"]
    r_none, _, _ = evaluate_sequences(tiny_engine, tiny_model_dir, without, QUOKKA, settings, baseline=baseline,
                                      work_dir=tmp_path)
    assert r_none == 0.0
    assert evaluate_sequences(tiny_engine, tiny_model_dir, [], QUOKKA, settings, baseline=baseline)[0] == 0.0


# --- the whole update: generator apart from the serving adapter ----------------------------------------


class StubSelfEditEngine:
    """A STUB around the tiny engine: self-edit prompts get fixed self-edits (the tiny model writes garbage);
    everything else (tau, scoring, adapters) goes to the real engine. Records the adapter each sample used."""

    SELF_EDITS = ["1. The zebra code is quokka.\n2. Remember: the zebra code is quokka.",
                  "- The sky is blue today.\n- Paris is the capital of France."]

    def __init__(self, engine) -> None:
        self.engine = engine
        self.sampled_with: list[str | None] = []

    def chat(self, conversations, params=None, adapter=None):
        if "Implications:" in conversations[0][-1]["content"]:
            self.sampled_with.append(adapter)
            return [Generation(self.SELF_EDITS[i % 2], 1, 1, "stop", adapter) for i in range(len(conversations))]
        return self.engine.chat(conversations, params, adapter)

    def __getattr__(self, name):
        return getattr(self.engine, name)


def _rank(adapter_dir: str | Path) -> int:
    return json.loads((Path(adapter_dir) / "adapter_config.json").read_text())["r"]


def _weights(adapter_dir: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))


def test_update_keeps_generator_apart_and_continues_it(tiny_engine, tiny_model_dir: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    parent = make_lora_adapter(tiny_model_dir, tmp_path / "serving-v1", seed=1, r=4)
    previous_generator = make_lora_adapter(tiny_model_dir, tmp_path / "generator-v1", seed=2, r=2)
    calls: list[str | None] = []
    real_train_generator = seal_restem.train_generator

    def recording_train_generator(base, examples, out, settings, previous=None, progress=None):
        calls.append(None if previous is None else str(previous))
        assert all("zebra code is quokka" in e.demonstration for e in examples)  # the rewarded self-edit
        return real_train_generator(base, examples, out, settings, previous, progress)

    monkeypatch.setattr(seal_restem, "train_generator", recording_train_generator)
    engine = StubSelfEditEngine(tiny_engine)
    staging = tmp_path / "staging"
    events: list[tuple[int, int, dict]] = []
    result = run_seal_update(
        tiny_model_dir,
        [SealDocument("d1", PASSAGE, "Quokka Institute", [q.to_dict() for q in QUOKKA])],
        _settings(reward_metric="logprob", rounds=2),
        output_dir=staging / "adapter",
        generator_output_dir=staging / "generator",
        parent_adapter_dir=parent,
        generator_adapter_dir=previous_generator,
        replay_examples=["An earlier document about Paris.",
                         {"prompt": [{"role": "user", "content": "q0"}], "demonstration": "answer 0"}],
        progress=lambda step, total, logs: events.append((step, total, logs)),
        engine=engine,
    )
    # The generator: its own directory, continued from the previous generator, then from round 1's.
    assert result.generator_adapter_dir == str(staging / "generator")
    assert calls[0] == str(previous_generator) and calls[1].endswith("generator-round-1") and len(calls) == 2
    assert engine.sampled_with == ["seal-generator", "seal-generator"]
    assert _rank(result.generator_adapter_dir) == 2  # the previous generator's shape, not generator_lora's 8
    gen_new, gen_old = _weights(result.generator_adapter_dir), _weights(previous_generator)
    assert any(not torch.equal(gen_new[k], gen_old[k]) for k in gen_old)
    # The serving candidate: continued from the serving parent, no generator weights in it.
    assert result.adapter_dir == str(staging / "adapter") and result.adapter_dir != result.generator_adapter_dir
    assert _rank(result.adapter_dir) == 4
    serving, parent_w = _weights(result.adapter_dir), _weights(parent)
    assert set(serving) == set(parent_w) and any(not torch.equal(serving[k], parent_w[k]) for k in parent_w)
    assert all(t.shape == parent_w[k].shape for k, t in serving.items())
    assert all(not torch.equal(t, gen_new[k]) for k, t in serving.items() if t.shape == gen_new[k].shape)
    assert sorted(p.name for p in staging.iterdir()) == ["adapter", "generator"]  # scratch removed
    assert tiny_engine.list_adapters() == []
    # What was chosen and reported.
    assert result.used_document_ids == ["d1"] and result.skipped_documents == {}
    doc = result.documents[0]
    assert doc["tau_source"] == "supplied" and "baseline" in doc
    assert {"source": "self_edit", "round": 1, "index": 0} == {k: doc["chosen"][0][k] for k in
                                                               ("source", "round", "index")}
    assert [r["round"] for r in result.rounds] == [1, 2] and all(r["kept"] == 1 for r in result.rounds)
    assert result.metrics["replay"] == 2 and result.metrics["sec_per_self_edit_eval"] > 0
    assert result.metrics["self_edits_scored"] == 4
    phases = {e[2]["phase"] for e in events}
    assert phases == {1.0, 2.0} and max(e[0] for e in events if e[2]["phase"] == 1.0) == 5  # 4 + passage only


def test_time_budget_and_fallback(tiny_engine, tiny_model_dir: Path, tmp_path: Path) -> None:
    docs = [SealDocument("d1", PASSAGE, None, [q.to_dict() for q in QUOKKA])]
    spent = run_seal_update(tiny_model_dir, docs, _settings(time_budget_s=1e-9), output_dir=tmp_path / "a",
                            generator_output_dir=tmp_path / "g", engine=tiny_engine)
    assert spent.adapter_dir is None and spent.used_document_ids == []
    assert "time budget" in spent.skipped_documents["d1"]
    # No self-edit can beat an impossible bar: the passage-alone fallback, or the document is left unused.
    kw = {"rounds": 0, "num_self_edits": 1, "min_gain": 1e9, "passage_only_candidate": False}
    with pytest.raises(ValueError, match="must differ"):
        run_seal_update(tiny_model_dir, docs, _settings(**kw), output_dir=tmp_path / "x",
                        generator_output_dir=tmp_path / "x", engine=tiny_engine)
    skip = run_seal_update(tiny_model_dir, docs, _settings(fallback="skip", **kw), output_dir=tmp_path / "b",
                           generator_output_dir=tmp_path / "g", engine=tiny_engine)
    assert skip.adapter_dir is None and "beat" in skip.skipped_documents["d1"] and skip.generator_adapter_dir is None
    fallback = run_seal_update(tiny_model_dir, docs, _settings(**kw), output_dir=tmp_path / "c",
                               generator_output_dir=tmp_path / "g", engine=tiny_engine)
    assert fallback.adapter_dir == str(tmp_path / "c") and fallback.used_document_ids == ["d1"]
    assert fallback.documents[0]["chosen"] == "passage_fallback" and fallback.metrics["update_sequences"] == 1


def test_seal_job_in_worker_process(tiny_model_dir: Path, tmp_path: Path) -> None:
    parent = make_lora_adapter(tiny_model_dir, tmp_path / "serving-v1", seed=1, r=4)
    settings = _settings(rounds=1, min_gain=-1e9, inner_training={**MEMORISE.__dict__, "num_epochs": 2},
                         update_training={**MEMORISE.__dict__, "num_epochs": 2})
    job = SealJob(
        base_model_dir=str(tiny_model_dir),
        documents=[
            SealDocument("with-q", PASSAGE, None, [q.to_dict() for q in QUOKKA]).to_dict(),
            SealDocument("no-q", "The refund window is now 45 days.", "Refunds").to_dict(),
        ],
        output_dir=str(tmp_path / "staging" / "adapter"),
        generator_output_dir=str(tmp_path / "staging" / "generator"),
        settings=settings.to_dict(),
        parent_adapter_dir=str(parent),
        num_threads=1,
    )
    steps: list[int] = []
    result = run_seal_process(job, lambda step, total, logs: steps.append(step), timeout_s=300)
    assert result["adapter_dir"] == job.output_dir and _rank(job.output_dir) == 4
    assert set(result["used_document_ids"]) == {"with-q", "no-q"}  # no-q: the passage fallback, if tau is empty
    by_id = {d["id"]: d for d in result["documents"]}
    assert by_id["with-q"]["tau_source"] == "supplied"
    assert by_id["no-q"]["tau_source"] == "generated" and by_id["no-q"]["tau_dropped"] >= 0
    assert result["generator_adapter_dir"] in (None, job.generator_output_dir)
    assert steps
    assert sorted(p.name for p in (tmp_path / "staging").iterdir()) in (["adapter"], ["adapter", "generator"])


def test_ingested_documents_with_and_without_questions(tmp_path: Path) -> None:
    from learners.seal import documents_from_store, replay_passages
    from runtime.store import Store

    with Store(tmp_path / "runtime.duckdb") as store:
        with_q = store.add_document(PASSAGE, title="Quokka Institute", questions=[q.to_dict() for q in QUOKKA])
        without_q = store.add_document("The zebra code is quokka. The institute is in Perth.")
        store.flush()
        docs = {d.id: d for d in documents_from_store(store)}
        assert set(docs) == {with_q, without_q} and docs[with_q].title == "Quokka Institute"
        taus = {i: prepare_tau(d.text, d.questions, None, title=d.title, generate=stub_generate_qa_any)
                for i, d in docs.items()}
        assert taus[with_q].source == "supplied" and taus[with_q].pairs == QUOKKA
        assert taus[without_q].source == "generated" and taus[without_q].dropped == 1
        assert taus[without_q].pairs == [QAPair("What is the zebra code?", "quokka"), QAPair("Where is it?", "Perth")]
        assert SealDocument(**docs[with_q].to_dict()) == docs[with_q]  # crosses the worker boundary as plain data
        run = store.create_run("seal")
        store.mark_consumed(run, document_ids=[with_q])
        assert [d.id for d in documents_from_store(store)] == [without_q]
        assert replay_passages(store, 5) == [passage_text(PASSAGE, "Quokka Institute")]
        assert replay_passages(store, 0) == []


def stub_generate_qa_any(prompt: list[dict[str, str]]) -> str:
    """A STUB model for any document: one answer in it, one answer not in it."""
    return "Q: What is the zebra code?\nA: quokka\nQ: Who founded it?\nA: Nobody knows\nQ: Where is it?\nA: Perth"
