"""The store's reads: typed rows from DuckDB, after the writer has committed what was queued before them.

:class:`StoreReads` is mixed into :class:`runtime.store.store.Store`, which provides ``_query`` (wait for the
writer, then run the SQL on a fresh cursor).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from runtime.store.encoding import check_choice
from runtime.store.models import (
    LEARNING_STATES,
    AdapterRecord,
    AdapterRole,
    AdapterStatus,
    DecisionKind,
    Document,
    Interaction,
    InteractionKind,
    LearningRun,
    LearningState,
    PolicyDecision,
    RunStatus,
    Signal,
    SignalKind,
    SignalReview,
)

_TABLES = ("interactions", "signals", "documents", "learning_runs", "adapters", "policy_decisions")


def _cols(model: type[Any], alias: str = "") -> str:
    prefix = f"{alias}." if alias else ""
    return ", ".join(prefix + c for c in model.COLUMNS)


class StoreReads:
    """Read methods; safe to call from any thread."""

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def get_interaction(self, interaction_id: str) -> Interaction | None:
        """The interaction with this id, or ``None``."""
        rows = self._query(f"SELECT {_cols(Interaction)} FROM interactions WHERE id = ?", [interaction_id])
        return Interaction.from_row(rows[0]) if rows else None

    def recent_interactions(self, limit: int = 20, *, kind: InteractionKind | None = None,
                            thread_id: str | None = None) -> list[Interaction]:
        """The latest interactions, newest first, optionally only one kind or one thread."""
        where, params = _where(kind=kind, thread_id=thread_id)
        rows = self._query(f"SELECT {_cols(Interaction)} FROM interactions{where} "
                           "ORDER BY created_at DESC, id DESC LIMIT ?", [*params, limit])
        return [Interaction.from_row(r) for r in rows]

    def shadow_pairs(self, limit: int | None = None, *,
                     adapter: str | None = None) -> list[tuple[Interaction, Interaction]]:
        """``(live, shadow)`` pairs, newest first, optionally only shadows served by ``adapter``."""
        where, params = _where(**{"s.adapter": adapter})
        sql = (f"SELECT {_cols(Interaction, 'l')}, {_cols(Interaction, 's')} FROM interactions s "
               f"JOIN interactions l ON s.shadow_of = l.id{where} ORDER BY s.created_at DESC, s.id DESC")
        rows = self._query(sql + _limit(limit), params)
        n = len(Interaction.COLUMNS)
        return [(Interaction.from_row(r[:n]), Interaction.from_row(r[n:])) for r in rows]

    def get_signal(self, signal_id: str) -> Signal | None:
        """The signal with this id, or ``None``."""
        rows = self._query(f"SELECT {_cols(Signal)} FROM signals WHERE id = ?", [signal_id])
        return Signal.from_row(rows[0]) if rows else None

    def signals(self, kind: SignalKind | None = None, *, unconsumed_only: bool = False,
                interaction_id: str | None = None, interaction_ids: Sequence[str] | None = None,
                state: LearningState | None = None, limit: int | None = None,
                principal: str | None = None) -> list[Signal]:
        """Signals, oldest first, filtered by kind / interaction (one, or any of several) / learning state /
        principal (who sent them).

        ``unconsumed_only`` is ``state="pending"``: what the next cycle learns.
        """
        if state is not None:
            check_choice(state, LEARNING_STATES, "state")
        where, params = _where(kind=kind, interaction_id=interaction_id, state=state, principal=principal,
                               unconsumed=unconsumed_only)
        if interaction_ids is not None:
            if not interaction_ids:
                return []
            ids = list(interaction_ids)
            where += (" AND " if where else " WHERE ") + f"interaction_id IN ({', '.join('?' * len(ids))})"
            params += ids
        rows = self._query(f"SELECT {_cols(Signal)} FROM signals{where} ORDER BY created_at, id"
                           + _limit(limit), params)
        return [Signal.from_row(r) for r in rows]

    def count_recent_signals(self, principal: str, since: datetime) -> int:
        """How many signals and documents `principal` sent at or after `since` (for rate limits)."""
        rows = self._query(
            "SELECT (SELECT count(*) FROM signals WHERE principal = ? AND created_at >= ?) "
            "+ (SELECT count(*) FROM documents WHERE principal = ? AND created_at >= ?)",
            [principal, since, principal, since],
        )
        return int(rows[0][0])

    def signal_reviews(self, signal_id: str | None = None) -> list[SignalReview]:
        """Review decisions, oldest first (of one signal, when given)."""
        where, params = _where(signal_id=signal_id)
        rows = self._query(f"SELECT {_cols(SignalReview)} FROM signal_reviews{where} ORDER BY decided_at, id", params)
        return [SignalReview.from_row(r) for r in rows]

    def get_document(self, document_id: str) -> Document | None:
        """The document with this id, or ``None``."""
        rows = self._query(f"SELECT {_cols(Document)} FROM documents WHERE id = ?", [document_id])
        return Document.from_row(rows[0]) if rows else None

    def documents(self, *, unconsumed_only: bool = False, state: LearningState | None = None,
                  limit: int | None = None) -> list[Document]:
        """Documents, oldest first, optionally in one learning state (``unconsumed_only``: ``pending``)."""
        if state is not None:
            check_choice(state, LEARNING_STATES, "state")
        where, params = _where(state=state, unconsumed=unconsumed_only)
        rows = self._query(f"SELECT {_cols(Document)} FROM documents{where} ORDER BY created_at, id"
                           + _limit(limit), params)
        return [Document.from_row(r) for r in rows]

    def get_run(self, run_id: str) -> LearningRun | None:
        """The learning run with this id, or ``None``."""
        rows = self._query(f"SELECT {_cols(LearningRun)} FROM learning_runs WHERE id = ?", [run_id])
        return LearningRun.from_row(rows[0]) if rows else None

    def runs(self, limit: int | None = None, *, status: RunStatus | None = None,
             method: str | None = None) -> list[LearningRun]:
        """Learning runs, newest first, optionally filtered by status and method."""
        where, params = _where(status=status, method=method)
        rows = self._query(f"SELECT {_cols(LearningRun)} FROM learning_runs{where} "
                           "ORDER BY created_at DESC, id DESC" + _limit(limit), params)
        return [LearningRun.from_row(r) for r in rows]

    def get_adapter(self, name: str) -> AdapterRecord | None:
        """The adapter with this name, or ``None``."""
        rows = self._query(f"SELECT {_cols(AdapterRecord)} FROM adapters WHERE name = ?", [name])
        return AdapterRecord.from_row(rows[0]) if rows else None

    def adapters(self, *, status: AdapterStatus | None = None, role: AdapterRole | None = None) -> list[AdapterRecord]:
        """Adapters, oldest first, optionally only those with ``status`` and/or ``role``."""
        where, params = _where(status=status, role=role)
        rows = self._query(f"SELECT {_cols(AdapterRecord)} FROM adapters{where} ORDER BY created_at, name",
                           params)
        return [AdapterRecord.from_row(r) for r in rows]

    def decisions(self, limit: int | None = None, *, adapter: str | None = None,
                  decision: DecisionKind | None = None) -> list[PolicyDecision]:
        """Policy decisions, newest first, optionally about one adapter or of one kind."""
        where, params = _where(adapter=adapter, decision=decision)
        rows = self._query(f"SELECT {_cols(PolicyDecision)} FROM policy_decisions{where} "
                           "ORDER BY created_at DESC, id DESC" + _limit(limit), params)
        return [PolicyDecision.from_row(r) for r in rows]

    def learning_figures(self) -> dict[str, Any]:
        """What an operator's metrics ask of the log: runs by method and status, decisions by kind, vetoes by
        failing check (kind and name), signals by state, and for every learned signal the seconds from its
        arrival to the promotion of the adapter that learned it."""
        runs = self._query("SELECT method, status, count(*) FROM learning_runs GROUP BY ALL")
        decisions = self._query("SELECT decision, count(*) FROM policy_decisions GROUP BY ALL")
        signals = self._query("SELECT state, count(*) FROM signals GROUP BY ALL")
        vetoes: dict[tuple[str, str], int] = {}
        for (checks,) in self._query("SELECT checks FROM policy_decisions WHERE decision = 'veto'"):
            for check in json.loads(checks) if isinstance(checks, str) else (checks or []):
                if isinstance(check, dict) and check.get("veto"):
                    key = (str(check.get("kind", "")), str(check.get("name", "")))
                    vetoes[key] = vetoes.get(key, 0) + 1
        served = self._query(
            "SELECT epoch(min(d.created_at)) - epoch(s.created_at) FROM signals s "
            "JOIN learning_runs r ON r.id = s.consumed_by_run "
            "JOIN policy_decisions d ON d.adapter = r.output_adapter AND d.decision = 'promote' "
            "WHERE s.state = 'learned' GROUP BY s.id, s.created_at"
        )
        delays = [float(d) for (d,) in served if d is not None]
        return {
            "correction_to_serving_seconds": delays,
            "runs": {(str(m), str(st)): int(n) for m, st, n in runs},
            "decisions": {str(d): int(n) for d, n in decisions},
            "vetoes_by_check": vetoes,
            "signals_by_state": {str(st): int(n) for st, n in signals},
        }

    def counts(self) -> dict[str, int]:
        """Row count per table (``interactions``, ``signals``, ...)."""
        sql = " UNION ALL ".join(f"SELECT '{t}', count(*) FROM {t}" for t in _TABLES)
        return {name: int(n) for name, n in self._query(sql)}


def _where(*, unconsumed: bool = False, **equals: Any) -> tuple[str, list[Any]]:
    """A WHERE clause for ``column = value`` on the given non-None values (plus an unconsumed filter)."""
    clauses = [f"{column} = ?" for column, value in equals.items() if value is not None]
    params = [value for value in equals.values() if value is not None]
    if unconsumed:
        clauses.append("state = 'pending'")
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


def _limit(limit: int | None) -> str:
    return "" if limit is None else f" LIMIT {int(limit)}"
