"""The `runtime` CLI: config, log, learn and adapters commands on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from typer.testing import CliRunner

from cli.app import app
from runtime.store import Store

runner = CliRunner()


def write_config(tmp_path: Path, model_dir: Path) -> Path:
    path = tmp_path / "runtime.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "data_dir": "data",
                "model": {"name": str(model_dir)},
                "engine": {"device": "cpu", "num_threads": 1},
                "learning": {"method": "sft", "sft": {"num_epochs": 1}, "lora": {"r": 4}},
            }
        )
    )
    return path


def test_config_show_and_schema(tmp_path: Path) -> None:
    path = tmp_path / "runtime.yaml"
    path.write_text("engine:\n  device: cpu\n")
    shown = runner.invoke(app, ["config", "show", "--config", str(path)])
    assert shown.exit_code == 0, shown.output
    assert yaml.safe_load(shown.output)["engine"]["device"] == "cpu"
    schema = runner.invoke(app, ["config", "schema"])
    assert schema.exit_code == 0
    assert "engine" in json.loads(schema.output)["properties"]


def test_bad_config_exits_2_with_line(tmp_path: Path) -> None:
    path = tmp_path / "runtime.yaml"
    path.write_text("engine:\n  devcie: cpu\n")
    result = runner.invoke(app, ["config", "show", "--config", str(path)])
    assert result.exit_code == 2
    assert "runtime.yaml:2" in result.output and "engine.devcie" in result.output


def test_log_learn_and_adapters(tmp_path: Path, tiny_model_dir: Path) -> None:
    path = write_config(tmp_path, tiny_model_dir)
    missing = runner.invoke(app, ["log", "--config", str(path)])
    assert missing.exit_code == 1 and "no store" in missing.output

    with Store(tmp_path / "data" / "runtime.duckdb") as store:
        iid = store.log_interaction([{"role": "user", "content": "Capital of Veloria?"}], "Nova Haven", thread_id="t")
        store.add_signal("correction", interaction_id=iid, text="Marenport")

    log = runner.invoke(app, ["log", "--config", str(path)])
    assert log.exit_code == 0, log.output
    assert "Capital of Veloria?" in log.output and "Marenport" in log.output and "correction" in log.output

    learned = runner.invoke(app, ["learn", "--config", str(path), "--method", "sft"])
    assert learned.exit_code == 0, learned.output
    assert "activated" in learned.output

    listed = runner.invoke(app, ["adapters", "list", "--config", str(path)])
    assert listed.exit_code == 0 and "active" in listed.output and "sft-" in listed.output
    with Store(tmp_path / "data" / "runtime.duckdb", read_only=True) as store:
        name = store.adapters()[0].name
        settings = store.runs()[0].config["settings"]  # the hyperparameters the run used, complete
    assert settings["num_epochs"] == 1 and "learning_rate" in settings and "min_steps" in settings
    shown = runner.invoke(app, ["adapters", "show", name, "--config", str(path)])
    assert shown.exit_code == 0 and "lineage: base ->" in shown.output and "train_seconds" in shown.output
    unknown = runner.invoke(app, ["adapters", "show", "nope", "--config", str(path)])
    assert unknown.exit_code == 1

    again = runner.invoke(app, ["learn", "--config", str(path)])
    assert again.exit_code == 0 and "nothing_to_learn" in again.output


def test_ingest_and_learn_seal(tmp_path: Path, tiny_model_dir: Path) -> None:
    """`runtime ingest` + `runtime learn --method seal` publish a serving adapter and keep the generator
    apart. The tiny random model writes unusable self-edits and questions, so tau is supplied and the
    knowledge update falls back to the passage (the configured `fallback`)."""
    path = tmp_path / "runtime.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "data_dir": "data",
                "model": {"name": str(tiny_model_dir)},
                "engine": {"device": "cpu", "num_threads": 1},
                "learning": {
                    "lora": {"r": 4},
                    "seal": {
                        "num_self_edits": 1, "rounds": 1, "max_self_edit_tokens": 8, "eval_max_new_tokens": 4,
                        "inner_training": {"num_epochs": 1}, "update_training": {"num_epochs": 1},
                    },
                },
            }
        )
    )
    doc = tmp_path / "policy.md"
    doc.write_text("The refund window is now 45 days for all orders placed online.")
    qs = tmp_path / "q.jsonl"
    qs.write_text(json.dumps({"question": "How long is the refund window?", "answer": "45 days"}) + "\n")
    stored = runner.invoke(app, ["ingest", str(doc), "--questions", str(qs), "--config", str(path)])
    assert stored.exit_code == 0, stored.output
    assert "1 supplied questions kept, 0 dropped" in stored.output

    learned = runner.invoke(app, ["learn", "--config", str(path), "--method", "seal"])
    assert learned.exit_code == 0, learned.output
    assert "activated" in learned.output
    with Store(tmp_path / "data" / "runtime.duckdb", read_only=True) as store:
        serving = store.adapters(status="active")
        assert len(serving) == 1 and serving[0].method == "seal" and serving[0].role == "serving"
        assert all(d.consumed_by_run for d in store.documents())
        assert all(a.method == "seal" for a in store.adapters())
        generators = store.adapters(role="generator")
        assert all(g.status != "active" for g in generators)
    again = runner.invoke(app, ["learn", "--config", str(path), "--method", "seal"])
    assert "nothing_to_learn" in again.output

    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    refused = runner.invoke(app, ["ingest", str(bad), "--config", str(path)])
    assert refused.exit_code == 2 and "bad.jsonl:1" in refused.output


def test_learn_method_auto_keeps_the_candidate_that_learns(tmp_path: Path, tiny_model_dir: Path) -> None:
    """`runtime learn --method auto`: two candidates trained, the one that learned is kept and activated."""
    retention = tmp_path / "retention.jsonl"
    retention.write_text(
        json.dumps({"context": "The sky is blue.", "questions": [{"question": "Colour?", "answer": "blue"}]}) + "\n"
    )
    path = write_config(tmp_path, tiny_model_dir)
    config = yaml.safe_load(path.read_text())
    config["learning"]["auto"] = {
        "candidates": [
            {"method": "sft", "learning_rate": 1e-7, "num_epochs": 1},  # cannot learn anything
            {"method": "sft", "learning_rate": 2e-2, "num_epochs": 8},
        ],
        "retention_file": str(retention),
        "retention_questions": 1,
        "max_retention_drop": 100.0,
    }
    path.write_text(yaml.safe_dump(config))
    with Store(tmp_path / "data" / "runtime.duckdb") as store:
        store.add_signal("demonstration", text="zebra zebra", messages=[{"role": "user", "content": "animal?"}])

    learned = runner.invoke(app, ["learn", "--config", str(path), "--method", "auto"])
    assert learned.exit_code == 0, learned.output
    assert "activated" in learned.output
    with Store(tmp_path / "data" / "runtime.duckdb", read_only=True) as store:
        [adapter] = store.adapters()
        report = store.get_run(adapter.run_id).metrics["auto"]
    assert adapter.status == "active" and adapter.method == "sft"
    assert report["chosen"] == 1 and "smallest retention drop" in report["reason"]


def test_a_vetoed_cycle_exits_3_and_its_signals_can_be_retried_or_dismissed(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """A policy whose target check a one-epoch tiny model cannot pass: the gate vetoes, `learn` exits 3, and the
    operator sees the held signals, retries one and dismisses the other."""
    path = write_config(tmp_path, tiny_model_dir)
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump({"targets": {"metric": "contains", "min_pass_rate": 1.0}}))
    with Store(tmp_path / "data" / "runtime.duckdb") as store:
        first = store.add_signal("demonstration", text="Zebulon Quartermaine",
                                 messages=[{"role": "user", "content": "Who?"}])
        second = store.add_signal("demonstration", text="Marenport Vale",
                                  messages=[{"role": "user", "content": "Where?"}])

    learned = runner.invoke(app, ["learn", "--config", str(path), "--policy", str(policy)])
    assert learned.exit_code == 3, learned.output
    assert "vetoed" in learned.output and "held" in learned.output

    held = runner.invoke(app, ["signals", "--config", str(path), "--state", "held", "--json"])
    assert held.exit_code == 0, held.output
    rows = json.loads(held.output)
    assert {r["id"] for r in rows} == {first, second} and all("target" in r["state_reason"] for r in rows)

    retried = runner.invoke(app, ["signals", "retry", first[:10], "--config", str(path)])
    assert retried.exit_code == 0 and "1 signal(s) pending" in retried.output
    no_reason = runner.invoke(app, ["signals", "dismiss", second, "--config", str(path), "--reason", " "])
    assert no_reason.exit_code == 2
    dismissed = runner.invoke(app, ["signals", "dismiss", second, "--config", str(path), "--reason", "wrong fact"])
    assert dismissed.exit_code == 0 and "1 signal(s) dismissed" in dismissed.output
    unknown = runner.invoke(app, ["signals", "retry", "nope", "--config", str(path)])
    assert unknown.exit_code == 1 and "matches no signal" in unknown.output
    bad_state = runner.invoke(app, ["signals", "--config", str(path), "--state", "lost"])
    assert bad_state.exit_code == 2

    with Store(tmp_path / "data" / "runtime.duckdb", read_only=True) as store:
        assert store.get_signal(first).state == "pending" and store.get_signal(first).consumed_by_run is None
        dropped = store.get_signal(second)
        assert dropped.state == "dismissed" and dropped.state_reason == "wrong fact"
    listed = runner.invoke(app, ["signals", "--config", str(path)])
    assert listed.exit_code == 0 and "dismissed" in listed.output and "pending" in listed.output
    decisions = runner.invoke(app, ["decisions", "--config", str(path)])
    assert decisions.exit_code == 0 and "first" in decisions.output and "veto" in decisions.output


def test_learn_method_flag_runs_what_its_name_says(tmp_path: Path, tiny_model_dir: Path) -> None:
    """`--method rewrite` restates then SFT; `--method sdft` is on-policy self-distillation; a typo is refused."""
    path = write_config(tmp_path, tiny_model_dir)
    config = yaml.safe_load(path.read_text())
    config["learning"].update(
        anchors={"enabled": False}, rewrite={"num_epochs": 1, "max_new_tokens": 4},
        sdft={"num_epochs": 1, "max_completion_length": 4, "prompts_per_step": 2},
    )
    path.write_text(yaml.safe_dump(config))
    unknown = runner.invoke(app, ["learn", "--config", str(path), "--method", "sdft-rewrite"])
    assert unknown.exit_code == 2 and "rewrite, sdft, sft, auto, seal" in " ".join(unknown.output.split())
    for method in ("rewrite", "sdft"):
        with Store(tmp_path / "data" / "runtime.duckdb") as store:
            store.add_signal("demonstration", text=f"{method} answer", messages=[{"role": "user", "content": "q?"}])
        learned = runner.invoke(app, ["learn", "--config", str(path), "--method", method])
        assert learned.exit_code == 0, learned.output
        with Store(tmp_path / "data" / "runtime.duckdb", read_only=True) as store:
            (active,) = store.adapters(status="active")
            run = store.get_run(active.run_id)
        assert active.method == method and active.name.startswith(f"{method}-") and run.method == method
        assert ("rewrite_seconds" in run.metrics) == (method == "rewrite")
        assert any("sdft/distillation_loss" in s for s in run.metrics["history"]) == (method == "sdft")


def test_an_old_config_with_the_sdft_rewrite_variant_is_told_what_to_write(tmp_path: Path) -> None:
    path = tmp_path / "runtime.yaml"
    path.write_text("learning:\n  sdft:\n    variant: rewrite\n    learning_rate: 1.0e-3\n  sfft: {}\n")
    shown = runner.invoke(app, ["config", "show", "--config", str(path)])
    assert shown.exit_code == 2
    text = " ".join(shown.output.split())  # the console wraps long lines
    assert "runtime.yaml:3: learning.sdft.variant" in text and "learning.method: rewrite" in text
    assert "runtime.yaml:5: learning.sfft: unknown key" in text


def test_serve_refuses_a_non_loopback_address_without_the_explicit_flag(tmp_path: Path) -> None:
    """Every signal is training data: an open server on a public address must be the operator's explicit choice."""
    from server.command import app as runtime_app

    result = runner.invoke(runtime_app, ["serve", "--host", "0.0.0.0", "--config", str(tmp_path / "none.yaml")])
    assert result.exit_code == 2
    assert "refusing to serve on 0.0.0.0" in result.output and "--allow-unauthenticated" in result.output


def test_serve_checks_the_port_before_loading_the_model(tmp_path: Path) -> None:
    import socket

    from server.command import app as runtime_app

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "runtime.yaml"
        config.write_text(f"data_dir: {tmp_path / 'data'}\n")
        result = runner.invoke(runtime_app, ["serve", "--port", str(port), "--config", str(config)])
    assert result.exit_code == 2 and f"cannot listen on 127.0.0.1:{port}" in result.output


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("runtime ")


def test_ingest_warns_when_no_evaluation_question_is_kept(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The tiny random model writes no usable question: the document is stored, and the operator is told."""
    path = tmp_path / "runtime.yaml"
    path.write_text(yaml.safe_dump({"data_dir": "data", "model": {"name": str(tiny_model_dir)},
                                    "engine": {"device": "cpu", "num_threads": 1}}))
    doc = tmp_path / "policy.md"
    doc.write_text("The refund window is 45 days.")
    result = runner.invoke(app, ["ingest", str(doc), "--config", str(path)])
    assert result.exit_code == 0, result.output
    assert "0 generated questions kept" in result.output and "no evaluation questions" in result.output


def test_adapters_export_travels_with_a_model_card(tmp_path: Path, tiny_model_dir: Path,
                                                   tiny_adapter_dir: Path) -> None:
    """An exported adapter names its base model by its public id, has a model card, and loads with PEFT from the
    new directory."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from runtime.adapters import AdapterRegistry, Lineage
    from runtime.models import DEFAULT_MODEL_ID, public_model_id

    assert public_model_id("smollm2-135m-instruct") == DEFAULT_MODEL_ID
    assert public_model_id("org/model") == "org/model"
    data = tmp_path / "data"
    config = tmp_path / "runtime.yaml"
    config.write_text(yaml.safe_dump({"data_dir": str(data), "model": {"name": str(tiny_model_dir)}}))
    staged = tmp_path / "staged"
    import shutil

    shutil.copytree(tiny_adapter_dir, staged)
    with Store(data / "runtime.duckdb") as store:
        registry = AdapterRegistry(data / "adapters", store)
        registry.publish(staged, "travel", Lineage(None, "rewrite", "run-x", {"new": 2, "replay": 1}, {}))
        registry.activate("travel", reason="approved by the gate")
    out = tmp_path / "export"
    result = runner.invoke(app, ["adapters", "export", "travel", str(out), "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "--lora-modules travel=" in result.output and "--lora-paths travel=" in result.output
    card = (out / "README.md").read_text()
    assert "rewrite" in card and "base -> travel" in card and '"new": 2' in card and "approved by the gate" in card
    exported_config = json.loads((out / "adapter_config.json").read_text())
    assert exported_config["base_model_name_or_path"] == public_model_id(str(tiny_model_dir))
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(out))
    again = runner.invoke(app, ["adapters", "export", "travel", str(out), "--config", str(config)])
    assert again.exit_code == 1 and "not empty" in again.output


def test_every_list_and_show_command_prints_json(tmp_path: Path, tiny_model_dir: Path, tiny_adapter_dir: Path
                                                 ) -> None:
    import shutil

    from runtime.adapters import AdapterRegistry, Lineage

    data = tmp_path / "data"
    config = tmp_path / "runtime.yaml"
    config.write_text(yaml.safe_dump({"data_dir": str(data), "model": {"name": str(tiny_model_dir)}}))
    shutil.copytree(tiny_adapter_dir, tmp_path / "staged")
    with Store(data / "runtime.duckdb") as store:
        registry = AdapterRegistry(data / "adapters", store)
        registry.publish(tmp_path / "staged", "a1", Lineage(None, "sft", "r", {}, {}))
        registry.activate("a1")
        store.add_signal("demonstration", text="x", messages=[{"role": "user", "content": "q"}])
    keys = tmp_path / "keys.yaml"
    assert runner.invoke(app, ["keys", "add", "ops", "--roles", "admin", "--file", str(keys)]).exit_code == 0
    for command in (["adapters", "list"], ["adapters", "show", "a1"], ["decisions"], ["signals"], ["log"]):
        result = runner.invoke(app, [*command, "--config", str(config), "--json"])
        assert result.exit_code == 0, (command, result.output)
        assert json.loads(result.output) is not None, command
    listed = runner.invoke(app, ["keys", "list", "--file", str(keys), "--json"])
    assert json.loads(listed.output) == [{"principal": "ops", "roles": ["admin"]}]
