"""Log shipping: app stores ship committed rows as Parquet segments to a shared location, a learner imports them
idempotently, and what the apps were taught reaches the learner's dataset (runtime.store.shipping / importing)."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.app import app
from learners.datasets import build_dataset
from orchestration.cycle import run_cycle
from runtime.config import RuntimeConfig
from runtime.shared_storage import filesystem
from runtime.store import LogShippingError, Store, import_segments, ship_segments
from runtime.store.migrations import MIGRATIONS
from runtime.store.shipping import shipping_status

LOG_TABLES = ("interactions", "signals", "documents")


def log_traffic(store: Store, name: str, n: int = 3) -> list[str]:
    """`n` interactions, a correction of the first, a taught answer and a document; returns the interaction ids."""
    ids = [store.log_interaction([{"role": "user", "content": f"{name} question {i}"}], f"{name} answer {i}")
           for i in range(n)]
    store.add_signal("correction", interaction_id=ids[0], text=f"{name} corrected answer")
    store.add_signal("demonstration", text=f"{name} taught answer",
                     messages=[{"role": "user", "content": f"{name} taught question"}])
    store.add_document(f"{name} knows something new")
    return ids


def log_counts(store: Store) -> dict[str, int]:
    counts = store.counts()
    return {t: counts[t] for t in LOG_TABLES}


def segment_files(url: str) -> list[str]:
    fs, root = filesystem(url)
    return sorted(p for p in fs.find(root, detail=False) if p.endswith(".parquet"))


@pytest.fixture
def stores(tmp_path: Path):
    """Two app stores and a learner store, closed at the end."""
    opened = [Store(tmp_path / f"{name}.duckdb") for name in ("app1", "app2", "learner")]
    yield opened
    for store in opened:
        store.close()


@pytest.fixture(params=["path", "file-url", "memory"])
def shared(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A shared location as a plain path, a file:// URL and an in-memory fsspec filesystem."""
    if request.param != "memory":
        yield str(tmp_path / "shared") if request.param == "path" else (tmp_path / "shared").as_uri()
        return
    url = f"memory://logs-{uuid.uuid4().hex}"
    yield url
    fs, root = filesystem(url)
    if fs.exists(root):
        fs.rm(root, recursive=True)


def test_two_writers_ship_and_the_learner_imports_each_row_once(stores: list[Store], shared: str) -> None:
    app1, app2, learner = stores
    log_traffic(app1, "one")
    log_traffic(app2, "two", n=2)
    first, second = ship_segments(app1, shared), ship_segments(app2, shared)
    assert first.writer_id != second.writer_id and first.segment == second.segment == 1
    assert first.rows == {"interactions": 3, "documents": 1, "signals": 2}
    assert ship_segments(app1, shared).segment is None  # nothing new: no empty segment

    report = import_segments(learner, shared)
    assert len(report.imported) == 6 and not report.failed
    expected = {t: log_counts(app1)[t] + log_counts(app2)[t] for t in LOG_TABLES}
    assert log_counts(learner) == expected
    origins = {row[0] for row in learner._query("SELECT DISTINCT origin FROM signals")}
    assert origins == {first.writer_id, second.writer_id}

    again = import_segments(learner, shared)
    assert again.imported == [] and again.already_imported == 6
    assert log_counts(learner) == expected

    app2.add_signal("rating", interaction_id=app2.recent_interactions(1)[0].id, rating=1.0)
    assert ship_segments(app2, shared).rows == {"signals": 1}  # only what is new since the last shipment
    assert import_segments(learner, shared).rows_added == {"signals": 1}
    assert log_counts(learner)["signals"] == expected["signals"] + 1


def test_a_duplicate_segment_or_row_changes_nothing(stores: list[Store], tmp_path: Path) -> None:
    app1, _app2, learner = stores
    shared = tmp_path / "shared"
    log_traffic(app1, "one")
    report = ship_segments(app1, str(shared))
    import_segments(learner, str(shared))
    before = log_counts(learner)
    signals = shared / report.writer_id / "000000000001.signals.parquet"
    shutil.copy(signals, shared / report.writer_id / "000000000009.signals.parquet")  # same segment, new number
    (shared / "restored-copy").mkdir()
    shutil.copy(signals, shared / "restored-copy" / "000000000001.signals.parquet")  # same rows, other writer

    duplicate = import_segments(learner, str(shared))
    assert set(duplicate.imported) == {f"{report.writer_id}/000000000009.signals", "restored-copy/000000000001.signals"}
    assert duplicate.rows_added == {"signals": 0} and duplicate.rows_already_present == 4
    assert log_counts(learner) == before


def test_a_writer_that_cannot_reach_the_share_keeps_its_rows_and_ships_them_later(
        stores: list[Store], tmp_path: Path) -> None:
    app1, _app2, learner = stores
    shared = tmp_path / "shared"
    shared.write_text("not a directory")  # the share is "down": nothing can be created under it
    log_traffic(app1, "one")
    with pytest.raises(LogShippingError, match="stay in the local store"):
        ship_segments(app1, str(shared))
    assert shipping_status(app1)["tables"]["interactions"]["unshipped_rows"] == 3  # type: ignore[index]
    app1.log_interaction([{"role": "user", "content": "while down"}], "still logged")

    shared.unlink()  # the share is back
    report = ship_segments(app1, str(shared))
    assert report.rows["interactions"] == 4 and report.segment == 2  # the failed attempt's number is never reused
    import_segments(learner, str(shared))
    assert log_counts(learner) == log_counts(app1)
    assert all(t["unshipped_rows"] == 0 for t in shipping_status(app1)["tables"].values())  # type: ignore[union-attr]


def test_half_written_uploads_and_foreign_files_are_ignored(stores: list[Store], tmp_path: Path) -> None:
    app1, _app2, learner = stores
    shared = tmp_path / "shared"
    log_traffic(app1, "one")
    report = ship_segments(app1, str(shared))
    folder = shared / report.writer_id
    (folder / ".tmp-000000000002.signals.parquet.0123abcd").write_bytes(b"PAR1 half of a segm")
    (folder / "notes.txt").write_text("not a segment")
    (shared / "000000000003.signals.parquet").write_bytes(b"outside any writer folder")

    imported = import_segments(learner, str(shared))
    assert not imported.failed and len(imported.imported) == 3
    assert log_counts(learner) == log_counts(app1)


def test_a_corrupt_segment_is_reported_skipped_and_retried(stores: list[Store], tmp_path: Path) -> None:
    app1, app2, learner = stores
    shared = tmp_path / "shared"
    log_traffic(app1, "one")
    log_traffic(app2, "two")
    good = ship_segments(app1, str(shared))
    bad = ship_segments(app2, str(shared))
    damaged = shared / bad.writer_id / "000000000001.signals.parquet"
    intact = damaged.read_bytes()
    damaged.write_bytes(intact[: len(intact) // 2])

    report = import_segments(learner, str(shared))
    name = f"{bad.writer_id}/000000000001.signals"
    assert list(report.failed) == [name] and "tried again on the next import" in report.failed[name]
    assert len(report.imported) == 5  # the other writer's segments and the damaged writer's other tables
    assert log_counts(learner)["signals"] == good.rows["signals"]

    assert list(import_segments(learner, str(shared)).failed) == [name]  # still unreadable: reported again
    damaged.write_bytes(intact)  # e.g. restored, or shipped again
    retried = import_segments(learner, str(shared))
    assert retried.imported == [name] and not retried.failed
    assert log_counts(learner)["signals"] == good.rows["signals"] + bad.rows["signals"]


def test_signals_taught_in_two_apps_reach_the_learners_dataset(stores: list[Store], tmp_path: Path) -> None:
    app1, app2, learner = stores
    shared = str(tmp_path / "shared")
    log_traffic(app1, "one")
    log_traffic(app2, "two")
    for writer in (app1, app2):
        ship_segments(writer, shared)
    assert build_dataset(learner).new == []
    import_segments(learner, shared)
    learned = {example.demonstration: example.prompt[-1]["content"] for example in build_dataset(learner).new}
    assert learned == {  # a correction's prompt comes from its interaction, shipped by the same app
        "one corrected answer": "one question 0", "one taught answer": "one taught question",
        "two corrected answer": "two question 0", "two taught answer": "two taught question",
    }


def test_two_stores_under_one_writer_id_are_refused_without_losing_rows(stores: list[Store], tmp_path: Path) -> None:
    app1, app2, learner = stores
    shared = str(tmp_path / "shared")
    log_traffic(app1, "one")
    log_traffic(app2, "two")
    ship_segments(app1, shared, writer="app")
    with pytest.raises(LogShippingError, match="another store ships under writer id 'app'"):
        ship_segments(app2, shared, writer="app")
    ship_segments(app2, shared, writer="app-2")
    import_segments(learner, shared)
    assert log_counts(learner)["signals"] == 4


def test_the_store_ships_in_the_background_and_at_close_with_a_stable_writer_id(tmp_path: Path) -> None:
    shared = str(tmp_path / "shared")
    path = tmp_path / "app.duckdb"
    with Store(path) as spool:  # a process that ran before shipping was configured, or while the share was down
        log_traffic(spool, "early")
    with Store(path, ship_to=shared, ship_interval_s=3600) as store:
        assert store.log_sync is not None and store.log_sync.wait_for_rounds(1, timeout=60)
        assert store.log_sync.last_ship is not None and store.log_sync.last_ship.rows["interactions"] == 3
        writer = store.log_sync.last_ship.writer_id
        store.add_signal("demonstration", text="late", messages=[{"role": "user", "content": "late question"}])
    # close() shipped the signal logged after the last round
    assert [Path(p).name for p in segment_files(shared)][-1] == "000000000002.signals.parquet"
    with Store(path, ship_to=shared, ship_interval_s=3600) as reopened:
        assert reopened.log_sync is not None and reopened.log_sync.wait_for_rounds(1, timeout=60)
        assert shipping_status(reopened)["writer_id"] == writer
    with Store(tmp_path / "learner.duckdb", import_from=shared, ship_interval_s=3600) as learner:
        assert learner.log_sync is not None and learner.log_sync.wait_for_rounds(1, timeout=60)
        assert log_counts(learner) == {"interactions": 3, "signals": 3, "documents": 1}


def test_a_store_from_before_log_shipping_ships_its_old_rows(tmp_path: Path) -> None:
    path = tmp_path / "old.duckdb"
    with Store(path, migrations=MIGRATIONS[:4]) as old:
        log_traffic(old, "old")
    shared = str(tmp_path / "shared")
    with Store(path) as migrated:
        assert ship_segments(migrated, shared).rows == {"interactions": 3, "documents": 1, "signals": 2}


def test_a_learning_cycle_imports_what_was_shipped_first(tmp_path: Path, tiny_model_dir: Path) -> None:
    shared = str(tmp_path / "shared")
    with Store(tmp_path / "app.duckdb") as app_store:
        app_store.log_interaction([{"role": "user", "content": "hi"}], "hello")
        ship_segments(app_store, shared)
    config = RuntimeConfig.model_validate({
        "data_dir": str(tmp_path / "data"), "model": {"name": str(tiny_model_dir)},
        "engine": {"device": "cpu", "num_threads": 1}, "store": {"import_from": shared},
    })
    with Store(config.store_path) as learner:  # opened without import_from: only the cycle imports
        assert run_cycle(config, learner, "sft").status == "nothing_to_learn"
        assert learner.counts()["interactions"] == 1


def test_logs_commands_ship_import_and_report(tmp_path: Path) -> None:
    runner = CliRunner()
    shared = tmp_path / "shared"
    configs = {}
    for name in ("app", "learner"):
        config = tmp_path / f"{name}.yaml"
        config.write_text(f"data_dir: {tmp_path / name}\nstore:\n  writer_id: {name}-1\n")
        configs[name] = str(config)
    with Store(tmp_path / "app" / "runtime.duckdb") as app_store:
        log_traffic(app_store, "one")

    missing = runner.invoke(app, ["logs", "ship", "--config", configs["app"]])
    assert missing.exit_code == 2 and "store.ship_to" in missing.output
    shipped = runner.invoke(app, ["logs", "ship", "--config", configs["app"], "--to", str(shared)])
    assert shipped.exit_code == 0, shipped.output
    assert "shipped segment 1 of writer app-1" in shipped.output
    assert (shared / "app-1" / "000000000001.signals.parquet").is_file()

    imported = runner.invoke(app, ["logs", "import", "--config", configs["learner"], "--from", str(shared)])
    assert imported.exit_code == 0 and "imported 3 segments" in imported.output, imported.output
    (shared / "app-1" / "000000000002.signals.parquet").write_bytes(b"garbage")
    failed = runner.invoke(app, ["logs", "import", "--config", configs["learner"], "--from", str(shared)])
    assert failed.exit_code == 1 and "app-1/000000000002.signals" in failed.output

    status = runner.invoke(app, ["logs", "status", "--config", configs["app"], "--json"])
    assert status.exit_code == 0 and '"writer_id": "app-1"' in status.output
