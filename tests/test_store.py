"""The DuckDB store: batched background writes, migrations, refusal of files it must not touch, reads."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from datetime import UTC
from functools import partial
from pathlib import Path

import duckdb
import pytest

import runtime.store.store as store_module
from runtime.store import (
    MIGRATIONS,
    SCHEMA_VERSION,
    CorruptStoreError,
    MigrationError,
    NotAStoreError,
    ReadOnlyStoreError,
    SchemaTooNewError,
    Store,
    StoreBackpressureError,
    StoreClosedError,
    StoreLockedError,
    StoreNotFoundError,
    StoreTimeoutError,
    StoreWriterError,
    UnknownRecordError,
)
from runtime.store.inserts import make_inserter
from runtime.store.migrations import apply_migrations
from runtime.store.writer import CallOp

REPO = Path(__file__).resolve().parents[1]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Refund window?"}]
N = SCHEMA_VERSION
NEXT = [*MIGRATIONS, (N + 1, "ALTER TABLE interactions ADD COLUMN channel VARCHAR DEFAULT 'web'")]
"""The package's migrations plus one that a later release might add."""


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "store.duckdb") as store:
        yield store


def raw_count(store: Store, table: str) -> int:
    """Rows committed so far, read without the implicit flush of the public read methods."""
    cursor = store._read_root.cursor()
    try:
        return cursor.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    finally:
        cursor.close()


def block_writer(store: Store, seconds: float) -> None:
    """Make the writer busy for ``seconds`` (an operation that sleeps inside its transaction)."""
    store._writer.put(CallOp(lambda _conn: time.sleep(seconds), "sleep"), timeout=1)


def snapshot(path: Path) -> tuple[bytes, int, list[str]]:
    return path.read_bytes(), path.stat().st_mtime_ns, sorted(os.listdir(path.parent))


def run_python(code: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# --- writes and reads --------------------------------------------------------------------------------


def test_interaction_round_trip(db: Store) -> None:
    iid = db.log_interaction(MESSAGES, "45 days.", thread_id="t1", adapter="a1", model="smol",
                             latency_ms=12.5, prompt_tokens=20, completion_tokens=3, metadata={"user": "ü"})
    got = db.get_interaction(iid)
    assert got is not None
    assert (got.id, got.kind, got.thread_id, got.response, got.adapter, got.model) == (
        iid, "live", "t1", "45 days.", "a1", "smol")
    assert got.messages == MESSAGES and got.metadata == {"user": "ü"}
    assert (got.latency_ms, got.prompt_tokens, got.completion_tokens, got.shadow_of) == (12.5, 20, 3, None)
    assert got.created_at.tzinfo == UTC
    assert db.get_interaction("missing") is None
    assert len(iid) == 32 and int(iid, 16) >= 0


def test_write_returns_before_commit_and_flush_commits(tmp_path: Path) -> None:
    with Store(tmp_path / "s.duckdb", flush_interval_s=30) as store:
        ids = [store.log_interaction(MESSAGES, f"r{i}") for i in range(10)]
        assert raw_count(store, "interactions") == 0  # enqueued, not yet written (30 s batching window)
        start = time.monotonic()
        store.flush()
        assert time.monotonic() - start < 5  # a flush does not wait for the batching window
        assert raw_count(store, "interactions") == 10
        assert [i.id for i in store.recent_interactions(limit=10)][::-1] == ids


def test_flush_timeout(db: Store) -> None:
    block_writer(db, 1.0)
    db.log_interaction(MESSAGES, "late")
    with pytest.raises(StoreTimeoutError):
        db.flush(timeout=0.1)
    db.flush()
    assert db.counts()["interactions"] == 1


def test_reads_see_own_writes(db: Store) -> None:
    for i in range(5):
        iid = db.log_interaction(MESSAGES, f"r{i}")
        assert db.get_interaction(iid) is not None


def test_shadow_linked_to_live(db: Store) -> None:
    live = db.log_interaction(MESSAGES, "live answer", adapter="a1")
    shadow = db.log_interaction(MESSAGES, "shadow answer", kind="shadow", shadow_of=live, adapter="cand")
    db.log_interaction(MESSAGES, "unrelated")
    got = db.get_interaction(shadow)
    assert got is not None and got.kind == "shadow" and got.shadow_of == live
    pairs = db.shadow_pairs()
    assert [(a.id, b.id) for a, b in pairs] == [(live, shadow)]
    assert pairs[0][0].response == "live answer" and pairs[0][1].adapter == "cand"
    assert db.shadow_pairs(adapter="other") == []
    assert [i.id for i in db.recent_interactions(kind="shadow")] == [shadow]
    with pytest.raises(ValueError, match="shadow_of"):
        db.log_interaction(MESSAGES, "x", kind="shadow")
    with pytest.raises(ValueError, match="shadow_of"):
        db.log_interaction(MESSAGES, "x", shadow_of=live)


def test_invalid_input_rejected_in_caller(db: Store) -> None:
    with pytest.raises(ValueError, match="kind"):
        db.log_interaction(MESSAGES, "x", kind="canary")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="role"):
        db.log_interaction([{"text": "hi"}], "x")
    with pytest.raises(TypeError):
        db.log_interaction("hi", "x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="metadata"):
        db.log_interaction(MESSAGES, "x", metadata={"obj": object()})
    with pytest.raises(TypeError, match="metadata"):
        db.log_interaction(MESSAGES, "x", metadata={"nan": float("nan")})
    db.flush()
    assert db.counts()["interactions"] == 0


def test_concurrent_writers(tmp_path: Path) -> None:
    threads, per_thread = 8, 2_000
    returned: list[list[str]] = [[] for _ in range(threads)]
    with Store(tmp_path / "c.duckdb", queue_size=500, batch_size=256) as store:  # small: exercise blocking

        def work(n: int) -> None:
            for i in range(per_thread):
                returned[n].append(store.log_interaction(MESSAGES, f"{n}:{i}", thread_id=f"w{n}"))

        workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        store.flush()
        total, distinct = store._read_root.execute(
            "SELECT count(*), count(DISTINCT id) FROM interactions").fetchone()
        per = dict(store._read_root.execute(
            "SELECT thread_id, count(*) FROM interactions GROUP BY thread_id").fetchall())
        stored = {row[0] for row in store._read_root.execute("SELECT id FROM interactions").fetchall()}
    assert total == distinct == threads * per_thread
    assert per == {f"w{n}": per_thread for n in range(threads)}
    assert stored == {i for ids in returned for i in ids}


def test_reads_from_other_threads_during_writes(db: Store) -> None:
    errors: list[BaseException] = []
    stop = threading.Event()

    def read() -> None:
        try:
            while not stop.is_set():
                db.recent_interactions(limit=5)
                db.counts()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    readers = [threading.Thread(target=read) for _ in range(3)]
    for r in readers:
        r.start()
    for i in range(3_000):
        db.log_interaction(MESSAGES, f"r{i}")
    stop.set()
    for r in readers:
        r.join()
    assert errors == []
    assert db.counts()["interactions"] == 3_000


def test_restart_keeps_data(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "s.duckdb"  # parent dirs are created
    with Store(path) as store:
        iid = store.log_interaction(MESSAGES, "kept")
        sid = store.add_signal("rating", interaction_id=iid, rating=1)
        run = store.create_run("sft")
    with Store(path) as store:
        assert store.schema_version == SCHEMA_VERSION
        got = store.get_interaction(iid)
        assert got is not None and got.response == "kept"
        assert store.get_signal(sid) is not None and store.get_run(run) is not None
        store.log_interaction(MESSAGES, "second")
    with Store(path, read_only=True) as store:
        assert store.counts()["interactions"] == 2


def test_unclosed_store_is_flushed_at_exit(tmp_path: Path) -> None:
    path = tmp_path / "exit.duckdb"
    proc = run_python("""
        import sys
        from runtime.store import Store
        store = Store(sys.argv[1], flush_interval_s=30)
        for i in range(1000):
            store.log_interaction([{"role": "user", "content": "q"}], f"a{i}")
        # no flush, no close: the atexit hook must commit everything acknowledged
    """, str(path))
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "fail" not in err  # e.g. a lazy import at exit breaking the final batch
    with Store(path, read_only=True) as store:
        assert store.counts()["interactions"] == 1000


# --- errors in the writer -----------------------------------------------------------------------------


def test_writer_error_is_raised_on_flush_and_only_the_bad_row_is_lost(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = iter(["a" * 32, "b" * 32, "a" * 32, "c" * 32])  # the third id repeats the first: a PK violation
    monkeypatch.setattr(store_module, "new_id", lambda: next(ids))
    with Store(tmp_path / "e.duckdb", flush_interval_s=30) as store:
        for i in range(4):
            store.log_interaction(MESSAGES, f"r{i}")  # all four go in one batch, which fails and is replayed
        with pytest.raises(StoreWriterError) as info:
            store.flush()
        assert len(info.value.failures) == 1
        assert "a" * 32 in str(info.value) and "interactions" in str(info.value)
        assert sorted(i.response for i in store.recent_interactions()) == ["r0", "r1", "r3"]
        store.flush()  # the error was reported once
        monkeypatch.setattr(store_module, "new_id", lambda: "b" * 32)
        store.log_interaction(MESSAGES, "dup again")
        with pytest.raises(StoreWriterError):
            store.close()  # close reports errors too, after closing
    assert store.closed


def test_synchronous_updates_raise_their_own_errors(db: Store) -> None:
    with pytest.raises(UnknownRecordError, match="nope"):
        db.update_run("nope", status="running")
    with pytest.raises(UnknownRecordError, match="nope"):
        db.set_adapter_status("nope", "active")
    db.flush()  # not reported twice


def test_backpressure(tmp_path: Path) -> None:
    with Store(tmp_path / "b.duckdb", queue_size=2, put_timeout_s=0.2) as store:
        block_writer(store, 1.5)
        time.sleep(0.1)  # the writer has taken the sleep and is busy
        store.log_interaction(MESSAGES, "1")
        store.log_interaction(MESSAGES, "2")
        with pytest.raises(StoreBackpressureError, match="full"):
            store.log_interaction(MESSAGES, "3")
        assert store.counts()["interactions"] == 2


def test_closed_store(tmp_path: Path) -> None:
    store = Store(tmp_path / "x.duckdb")
    store.log_interaction(MESSAGES, "x")
    store.close()
    store.close()  # idempotent
    store.flush()  # nothing pending
    with pytest.raises(StoreClosedError):
        store.log_interaction(MESSAGES, "y")
    with pytest.raises(StoreClosedError):
        store.recent_interactions()
    with Store(tmp_path / "x.duckdb") as again:  # the path was released
        assert again.counts()["interactions"] == 1


def test_unnest_fallback_without_pyarrow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "make_inserter", partial(make_inserter, use_arrow=False))
    with Store(tmp_path / "u.duckdb") as store:
        ids = [store.log_interaction(MESSAGES, f"r{i}", latency_ms=1.5, prompt_tokens=i) for i in range(50)]
        store.add_signal("correction", interaction_id=ids[0], text="fixed")
        got = store.get_interaction(ids[7])
        assert got is not None and got.prompt_tokens == 7 and got.messages == MESSAGES
        assert got.created_at.year >= 2024
        assert store.counts()["interactions"] == 50 and len(store.signals()) == 1


# --- signals, documents, runs, adapters, decisions -----------------------------------------------------


def test_signals_and_consumption(db: Store) -> None:
    iid = db.log_interaction(MESSAGES, "30 days")
    rating = db.add_signal("rating", interaction_id=iid, rating=-1, comment="wrong")
    corr = db.add_signal("correction", interaction_id=iid, text="45 days")
    demo = db.add_signal("demonstration", messages=[{"role": "user", "content": "Q?"}], text="A.")
    with pytest.raises(ValueError):
        db.add_signal("rating")
    with pytest.raises(ValueError):
        db.add_signal("correction", text="no prompt")
    with pytest.raises(ValueError):
        db.add_signal("thumbs")  # type: ignore[arg-type]

    assert [s.id for s in db.signals()] == [rating, corr, demo]
    assert [s.id for s in db.signals("correction")] == [corr]
    assert [s.id for s in db.signals(interaction_id=iid)] == [rating, corr]
    got = db.get_signal(demo)
    assert got is not None and got.messages == [{"role": "user", "content": "Q?"}] and got.text == "A."
    assert db.get_signal(rating).rating == -1.0  # type: ignore[union-attr]

    doc = db.add_document("The refund window is 45 days.", title="policy",
                          questions=[{"question": "Refund window?", "answer": "45 days"}])
    assert db.mark_consumed("run1", signal_ids=[corr, demo], document_ids=[doc]) == 3
    assert [s.id for s in db.signals(unconsumed_only=True)] == [rating]
    assert db.documents(unconsumed_only=True) == []
    consumed = db.get_signal(corr)
    assert consumed is not None and consumed.consumed_by_run == "run1" and consumed.consumed_at is not None
    assert db.mark_consumed("run2", signal_ids=[corr, rating]) == 1  # corr keeps its first run
    assert db.get_signal(corr).consumed_by_run == "run1"  # type: ignore[union-attr]
    (document,) = db.documents()
    assert document.questions == [{"question": "Refund window?", "answer": "45 days"}]
    assert document.title == "policy" and document.consumed_by_run == "run1"


def test_learning_run_lifecycle(db: Store) -> None:
    run = db.create_run("sdft", config={"lr": 1e-3}, parent_adapter="a0", data_counts={"signals": 4})
    got = db.get_run(run)
    assert got is not None and got.status == "pending" and got.started_at is None
    assert got.config == {"lr": 1e-3} and got.data_counts == {"signals": 4} and got.parent_adapter == "a0"
    db.update_run(run, status="running")
    running = db.get_run(run)
    assert running is not None and running.started_at is not None and running.ended_at is None
    db.update_run(run, status="succeeded", metrics={"loss": 0.5}, output_adapter="a1")
    done = db.get_run(run)
    assert done is not None and done.status == "succeeded" and done.ended_at is not None
    assert done.metrics == {"loss": 0.5} and done.output_adapter == "a1"
    assert done.started_at == running.started_at
    failed = db.create_run("seal")
    db.update_run(failed, status="failed", error="OOM")
    assert [r.id for r in db.runs()] == [failed, run]
    assert [r.id for r in db.runs(status="failed")] == [failed]
    assert db.get_run(failed).error == "OOM"  # type: ignore[union-attr]
    with pytest.raises(ValueError):
        db.update_run(run, status="done")  # type: ignore[arg-type]


def test_adapters_lineage_and_status(db: Store) -> None:
    a1 = db.upsert_adapter("a1", "/adapters/a1", method="sft", checksum="abc", metrics={"acc": 0.5})
    assert a1.lineage == [] and a1.status == "candidate"
    db.upsert_adapter("a2", "/adapters/a2", parent="a1")
    a3 = db.upsert_adapter("a3", "/adapters/a3", parent="a2", run_id="r3")
    assert a3.lineage == ["a1", "a2"]
    db.set_adapter_status("a2", "active")
    assert [a.name for a in db.adapters(status="active")] == ["a2"]
    again = db.upsert_adapter("a1", "/adapters/a1-v2", status="retired")
    assert again.created_at == a1.created_at and again.path == "/adapters/a1-v2" and again.status == "retired"
    assert [a.name for a in db.adapters()] == ["a1", "a2", "a3"]
    assert db.get_adapter("missing") is None
    with pytest.raises(ValueError):
        db.set_adapter_status("a1", "live")  # type: ignore[arg-type]


def test_policy_decisions(db: Store) -> None:
    first = db.record_decision("a1", "veto", reasons=["protected: refuses broke"], checks={"refuses": False})
    second = db.record_decision("a2", "approve", run_id="r2")
    assert [d.id for d in db.decisions()] == [second, first]
    (veto,) = db.decisions(adapter="a1")
    assert veto.decision == "veto" and veto.reasons == ["protected: refuses broke"]
    assert veto.checks == {"refuses": False}
    assert db.decisions(limit=1)[0].run_id == "r2"
    with pytest.raises(ValueError):
        db.record_decision("a1", "maybe")  # type: ignore[arg-type]


# --- schema versions and migrations ---------------------------------------------------------------------


def _v1_file(path: Path) -> None:
    """A store file as the first release wrote it: one interaction; three demonstrations, one never consumed, one
    consumed by a run whose adapter serves, one by a run whose adapter the gate rejected."""
    conn = duckdb.connect(str(path))
    apply_migrations(conn, path, MIGRATIONS[:1])
    conn.execute("INSERT INTO interactions (id, created_at, kind, messages, response) "
                 "VALUES ('i1', now(), 'live', '[]', 'from v1')")
    for sid, run in (("s-new", None), ("s-good", "r-good"), ("s-bad", "r-bad")):
        conn.execute("INSERT INTO signals (id, created_at, kind, text, consumed_by_run) "
                     "VALUES (?, now(), 'demonstration', 'x', ?)", [sid, run])
    for run, adapter, status in (("r-good", "a-good", "active"), ("r-bad", "a-bad", "rejected")):
        conn.execute("INSERT INTO learning_runs (id, method, status, created_at, output_adapter) "
                     "VALUES (?, 'sft', 'succeeded', now(), ?)", [run, adapter])
        conn.execute("INSERT INTO adapters (name, path, status, created_at, updated_at) "
                     "VALUES (?, '/a', ?, now(), now())", [adapter, status])
    conn.execute("INSERT INTO adapters (name, path, method, status, created_at, updated_at) "
                 "VALUES ('seal-generator-1', '/g', 'seal-generator', 'candidate', now(), now())")
    conn.close()


def test_old_file_is_migrated_and_keeps_data(tmp_path: Path) -> None:
    path = tmp_path / "old.duckdb"
    _v1_file(path)
    calls: list[int] = []

    def last_step(conn: duckdb.DuckDBPyConnection) -> None:
        calls.append(N + 2)
        conn.execute("UPDATE interactions SET channel = 'api'")

    with Store(path, migrations=[*NEXT, (N + 2, last_step)]) as newer:
        assert newer.schema_version == N + 2 and calls == [N + 2]
        got = newer.get_interaction("i1")
        assert got is not None and got.response == "from v1"
        assert newer._read_root.execute("SELECT channel FROM interactions").fetchall() == [("api",)]
        newer.log_interaction(MESSAGES, "written now")  # inserts still work on the widened table
        assert newer.counts()["interactions"] == 2
        versions = newer._read_root.execute("SELECT version FROM schema_version ORDER BY version").fetchall()
        assert versions == [(v,) for v in range(1, N + 3)]
    with Store(path, migrations=[*NEXT, (N + 2, last_step)]):
        assert calls == [N + 2]  # applied once


def test_v2_gives_signals_learning_states(tmp_path: Path) -> None:
    """Signals a vetoed update consumed were silently lost before states existed: the migration holds them."""
    path = tmp_path / "old.duckdb"
    _v1_file(path)
    with Store(path) as store:
        states = {s.id: (s.state, s.consumed_by_run) for s in store.signals()}
        assert states == {"s-new": ("pending", None), "s-good": ("learned", "r-good"), "s-bad": ("held", "r-bad")}
        assert "vetoed" in (store.get_signal("s-bad").state_reason or "")  # type: ignore[union-attr]
        assert [s.id for s in store.signals(unconsumed_only=True)] == ["s-new"]


def test_v3_gives_adapters_a_role(tmp_path: Path) -> None:
    """SEAL's self-edit generators were told apart by a method name; now by their role."""
    path = tmp_path / "old.duckdb"
    _v1_file(path)
    with Store(path) as store:
        generator = store.get_adapter("seal-generator-1")
        assert generator.role == "generator" and generator.method == "seal"
        assert {a.name for a in store.adapters(role="serving")} == {"a-good", "a-bad"}
        with pytest.raises(ValueError):
            store.upsert_adapter("x", "/x", role="teacher")  # type: ignore[arg-type]


def test_failed_migration_rolls_back(tmp_path: Path) -> None:
    path = tmp_path / "m.duckdb"
    with Store(path) as store:
        store.log_interaction(MESSAGES, "kept")

    def half_done(conn: duckdb.DuckDBPyConnection) -> None:
        conn.execute("CREATE TABLE half_done (x INTEGER)")
        raise RuntimeError("boom")

    for failing in (half_done, "SELECT * FROM no_such_table"):
        with pytest.raises(MigrationError, match=f"step {N + 2}") as info:
            Store(path, migrations=[*NEXT, (N + 2, failing)])
        assert str(path) in str(info.value) and f"version {N}" in str(info.value)
        with Store(path) as store:  # still version N: step N+1 was rolled back together with step N+2
            assert store.schema_version == N
            columns = [r[0] for r in store._read_root.execute("DESCRIBE interactions").fetchall()]
            assert "channel" not in columns
            tables = [r[0] for r in store._read_root.execute("SHOW TABLES").fetchall()]
            assert "half_done" not in tables
            assert store.counts()["interactions"] == 1


def test_migration_list_must_be_ordered(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="increasing"):
        Store(tmp_path / "o.duckdb", migrations=[(2, "SELECT 1"), (1, "SELECT 1")])


def test_newer_schema_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "new.duckdb"
    with Store(path, migrations=NEXT) as store:
        store.log_interaction(MESSAGES, "from the future")
    before = snapshot(path)
    for read_only in (False, True):
        with pytest.raises(SchemaTooNewError) as info:
            Store(path, read_only=read_only)
        message = str(info.value)
        assert str(path) in message and f"version {N + 1}" in message and f"version {SCHEMA_VERSION}" in message
        assert "pgrade" in message
    assert snapshot(path) == before


def _truncated_store(path: Path) -> None:
    good = path.with_name("good.duckdb")
    with Store(good) as store:
        for i in range(200):
            store.log_interaction(MESSAGES, f"r{i}")
    data = good.read_bytes()
    good.unlink()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("kind", ["random", "truncated", "empty", "text"])
def test_corrupt_file_is_refused_untouched(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "bad.duckdb"
    if kind == "random":
        path.write_bytes(os.urandom(64 * 1024))
    elif kind == "truncated":
        _truncated_store(path)
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        path.write_text("id,response\n1,hello\n")
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    before = snapshot(path)
    for read_only in (False, True):
        with pytest.raises(CorruptStoreError) as info:
            Store(path, read_only=read_only)
        message = str(info.value)
        assert str(path) in message and "backup" in message and "Move it aside" in message
    assert snapshot(path) == before  # same bytes, same mtime, no WAL or other file beside it
    with Store(tmp_path / "fresh.duckdb"):  # the refusal released the path registry etc.
        pass


def test_foreign_duckdb_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.duckdb"
    conn = duckdb.connect(str(path))
    conn.execute("CREATE TABLE sales (id INTEGER)")
    conn.close()
    before = snapshot(path)
    with pytest.raises(NotAStoreError, match="sales"):
        Store(path)
    assert snapshot(path) == before


# --- opening modes and locks ---------------------------------------------------------------------------


def test_read_only(tmp_path: Path) -> None:
    path = tmp_path / "ro.duckdb"
    with pytest.raises(StoreNotFoundError):
        Store(path, read_only=True)
    assert not path.exists()
    with Store(path) as store:
        iid = store.log_interaction(MESSAGES, "hello")
    with Store(path, read_only=True) as ro:
        assert ro.get_interaction(iid) is not None
        assert ro.counts()["interactions"] == 1
        ro.flush()
        with pytest.raises(ReadOnlyStoreError):
            ro.log_interaction(MESSAGES, "nope")
        with pytest.raises(ReadOnlyStoreError):
            ro.create_run("sft")
        with pytest.raises(StoreLockedError):  # a writer in the same process cannot join a read-only open
            Store(path)


def test_second_writer_in_process_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "one.duckdb"
    with Store(path):
        with pytest.raises(StoreLockedError, match="already open"):
            Store(path)
        with pytest.raises(StoreLockedError):
            Store(path, read_only=True)


def test_store_held_by_another_process(tmp_path: Path) -> None:
    path = tmp_path / "held.duckdb"
    Store(path).close()
    proc = run_python("""
        import sys, time
        from runtime.store import Store
        store = Store(sys.argv[1])
        print("ready", flush=True)
        time.sleep(30)
    """, str(path))
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        for read_only in (True, False):
            with pytest.raises(StoreLockedError, match="another process"):
                Store(path, read_only=read_only)
    finally:
        proc.kill()
        proc.communicate()


def test_batch_queue_wakes_the_writer_only_when_needed() -> None:
    from runtime.store.queueing import BatchQueue

    q: BatchQueue[int] = BatchQueue(maxsize=10, batch_size=3, flush_interval_s=30)
    for i in range(4):
        q.put(i)
    start = time.monotonic()
    assert q.take() == [0, 1, 2]  # a full batch: no wait
    q.put(4, urgent=True)
    assert q.take() == [3, 4]  # an urgent item (someone waits on it): no wait
    assert time.monotonic() - start < 5
    short: BatchQueue[int] = BatchQueue(maxsize=10, batch_size=3, flush_interval_s=0.2)
    short.put(1)
    start = time.monotonic()
    assert short.take() == [1]
    assert time.monotonic() - start >= 0.15  # a lone item waits for company, up to the interval
    full: BatchQueue[int] = BatchQueue(maxsize=1, batch_size=1, flush_interval_s=30)
    full.put(1)
    with pytest.raises(queue.Full):
        full.put(2, timeout=0.05)
