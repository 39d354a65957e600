"""DuckDB store of the runtime: interactions, signals, documents, learning runs, adapters, decisions.

Open one :class:`Store` per file per process and share it::

    from runtime.store import Store

    with Store("data/runtime.duckdb") as store:
        iid = store.log_interaction([{"role": "user", "content": "hi"}], "hello", model="smollm2")
        store.add_signal("correction", interaction_id=iid, text="Hello! How can I help?")
        store.signals(unconsumed_only=True)

See :mod:`runtime.store.store` for the write path, durability and the crash loss window, and
:mod:`runtime.store.shipping` / :mod:`runtime.store.importing` for shipping the log to a learner as Parquet.
"""

from runtime.store.errors import (
    CorruptStoreError,
    MigrationError,
    NotAStoreError,
    ReadOnlyStoreError,
    SchemaTooNewError,
    StoreBackpressureError,
    StoreClosedError,
    StoreError,
    StoreLockedError,
    StoreNotFoundError,
    StoreTimeoutError,
    StoreWriterError,
    UnknownRecordError,
    WriteFailure,
)
from runtime.store.importing import ImportReport, import_segments
from runtime.store.migrations import MIGRATIONS, SCHEMA_VERSION, Migration, MigrationStep
from runtime.store.models import (
    AdapterRecord,
    AdapterRole,
    AdapterStatus,
    DecisionKind,
    Document,
    Interaction,
    InteractionKind,
    LearningRun,
    Message,
    PolicyDecision,
    ReviewDecision,
    RunStatus,
    Signal,
    SignalKind,
    SignalReview,
)
from runtime.store.segments import LogShippingError
from runtime.store.shipping import ShipReport, ship_segments
from runtime.store.store import Store

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "AdapterRecord",
    "AdapterRole",
    "AdapterStatus",
    "CorruptStoreError",
    "DecisionKind",
    "Document",
    "ImportReport",
    "Interaction",
    "InteractionKind",
    "LearningRun",
    "LogShippingError",
    "Message",
    "Migration",
    "MigrationError",
    "MigrationStep",
    "NotAStoreError",
    "PolicyDecision",
    "ReadOnlyStoreError",
    "ReviewDecision",
    "RunStatus",
    "SchemaTooNewError",
    "ShipReport",
    "Signal",
    "SignalKind",
    "SignalReview",
    "Store",
    "StoreBackpressureError",
    "StoreClosedError",
    "StoreError",
    "StoreLockedError",
    "StoreNotFoundError",
    "StoreTimeoutError",
    "StoreWriterError",
    "UnknownRecordError",
    "WriteFailure",
    "import_segments",
    "ship_segments",
]
