"""`ReplicaSet`: one engine over several serving replicas (vLLM, SGLang or ``runtime serve --role replica``).

Requests go to the replica *in rotation* with the fewest requests outstanding (ties in turn). A replica is in
rotation when it is reachable and has every adapter of the set loaded; one that fails at the transport level, or
answers that it lacks an adapter, leaves rotation at once (the request is retried on another replica) and is
probed in the background. When it answers again it first (re)loads the active adapter, then the others, then
rejoins.

Promotion is two-phase, and rollback the same way: :meth:`ReplicaSet.load_adapter` loads the candidate on every
replica in rotation (a replica that fails to load it leaves rotation until it catches up); only then does
:meth:`ReplicaSet.set_active_adapter` switch the adapter name the set sends. Every request names its adapter to
the replica explicitly (``ACTIVE`` is resolved when the request starts), so a replica serves exactly that adapter
or fails, and :attr:`Generation.adapter` says which adapter served it: no request is served by another adapter
without saying so. A replica that misses a promotion is also taken out of step (``DELETE
/admin/replica/active``), so that followers stop asking it for its default.

A *follower* set (``follow=True``, ``engine.follow_replicas``: app processes embedding ``LearningAgent`` beside the
learner) never changes adapters: its requests for the active adapter name no model, each runtime replica answers
with the default the learner set there and says which adapter that was (:attr:`Generation.adapter`). Replicas
that are not in step (fresh, restarted, or left behind by a promotion) refuse those requests (503) and leave the
follower's rotation until the learner has brought them in step. While the learner switches the replicas one after
another (phase 2, one HTTP call each), a follower's request may still be served by the previous adapter, and says
so.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

from runtime.engines.base import (
    ACTIVE,
    AdapterChoice,
    AdapterChoices,
    Conversation,
    Engine,
    Generation,
    SamplingParams,
    StreamResult,
    resolve_per_row,
    selected_adapter,
)
from runtime.engines.errors import AdapterExistsError, AdapterLoadError, EngineError, UnknownAdapterError
from runtime.engines.http_errors import ServerConnectionError
from runtime.engines.openai_http import OpenAIHTTPEngine, map_concurrently
from runtime.engines.runtime_replica import (
    ChecksumOf,
    ReplicaNotInStepError,
    RuntimeReplicaEngine,
    follower_refusal,
)
from runtime.engines.served_adapters import check_adapter_name
from runtime.engines.sglang_engine import SGLangEngine
from runtime.engines.vllm_engine import VLLMEngine

__all__ = ["NoReplicaAvailableError", "ReplicaEndpoint", "ReplicaSet", "ReplicaStatus"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_R = TypeVar("_R")

ReplicaKind = Literal["vllm", "sglang", "runtime"]


class NoReplicaAvailableError(EngineError):
    """No replica is in rotation (all down, or all still catching up); retry once one is back."""


@dataclass(frozen=True)
class ReplicaEndpoint:
    """One serving replica.

    Attributes:
        kind: ``vllm``, ``sglang``, or ``runtime`` (a ``runtime serve --role replica`` server).
        base_url: its address, e.g. ``http://10.0.0.5:8000``.
        api_key: sent as ``Authorization: Bearer ...``; for a runtime replica, its admin token.
    """

    kind: ReplicaKind
    base_url: str
    api_key: str | None = None


@dataclass(frozen=True)
class ReplicaStatus:
    """A replica as the set sees it now (:meth:`ReplicaSet.replicas`)."""

    base_url: str
    kind: ReplicaKind
    in_rotation: bool
    reason: str | None
    """Why it is out of rotation (``None`` when in)."""
    outstanding: int
    served: int
    """Requests it answered since the set started."""


@dataclass(frozen=True)
class _AdapterSpec:
    location: str
    checksum: str | None


@dataclass(eq=False)
class _Replica:
    endpoint: ReplicaEndpoint
    engine: OpenAIHTTPEngine | None = None
    in_rotation: bool = False
    reason: str | None = "not contacted yet"
    outstanding: int = 0
    served: int = 0
    order: int = field(default=0)


class ReplicaSet(Engine):
    """Several serving replicas of one base model as one :class:`~runtime.engines.base.Engine`.

    Args:
        endpoints: the replicas (at least one must answer when the set is built; the others join when they do).
        checksum_of: the checksum of a local adapter directory (the factory passes the registry's), sent to
            runtime replicas, which verify it before loading. :meth:`load_shared_adapter` takes the checksum
            directly instead (an adapter on shared storage, with the registry's checksum).
        probe_interval_s: how often replicas out of rotation are probed.
        timeout, connect_timeout: per request, as for :class:`~runtime.engines.openai_http.OpenAIHTTPEngine`.
        follow: follow the learner's promotions instead of making them (runtime replicas only; see the module
            docstring): adapter changes raise :class:`~runtime.engines.runtime_replica.FollowerError`.

    Example::

        engine = ReplicaSet([ReplicaEndpoint("vllm", "http://gpu1:8000"), ReplicaEndpoint("vllm", "http://gpu2:8000")])
        engine.load_adapter("v2", "/shared/adapters/v2")    # phase 1: on every replica
        engine.set_active_adapter("v2")                     # phase 2: requests now name v2

    A request that fails to connect is retried on the next replica; one that times out is not (a slow answer is
    not a dead replica, and a retry would double the load): the timeout is raised. Streams fail over only before
    their first delta.
    """

    def __init__(
        self,
        endpoints: Sequence[ReplicaEndpoint],
        *,
        checksum_of: ChecksumOf | None = None,
        probe_interval_s: float = 2.0,
        timeout: float = 300.0,
        connect_timeout: float = 5.0,
        follow: bool = False,
    ) -> None:
        if not endpoints:
            raise ValueError("A replica set needs at least one endpoint (engine.replicas).")
        if follow and any(e.kind != "runtime" for e in endpoints):
            raise ValueError(
                "Following the learner (engine.follow_replicas) needs runtime replicas (`runtime serve --role "
                "replica`): vLLM and SGLang servers have no default adapter that a learner sets. Point the app at "
                "runtime replicas, or at the learner's own `runtime serve`."
            )
        self.follower = follow
        urls = [e.base_url.rstrip("/") for e in endpoints]
        if len(set(urls)) != len(urls):
            raise ValueError(f"engine.replicas lists an address twice: {urls}")
        if probe_interval_s <= 0:
            raise ValueError(f"probe_interval_s must be positive, got {probe_interval_s}")
        self._checksum_of = checksum_of
        self._timeout, self._connect_timeout = timeout, connect_timeout
        self._probe_interval_s = probe_interval_s
        self._replicas = [_Replica(e, order=i) for i, e in enumerate(endpoints)]
        self._lock = threading.Lock()  # replica states, the adapter table, the active adapter
        self._changed = threading.Condition(self._lock)
        self._admin = threading.RLock()  # one adapter change or catch-up at a time (held across HTTP calls)
        self._adapters: dict[str, _AdapterSpec] = {}
        self._active: str | None = None
        self._turn = itertools.count()
        self._closed = False
        self._retired: list[OpenAIHTTPEngine] = []
        self._followed: str | None = None  # a follower: the adapter of the latest answer
        self._in_charge = False  # a learner: set once it chose the active adapter (then replicas are kept in step)
        self.context_length: int | None = None
        self.model_name = ""
        errors = []
        reached = 0
        for replica in self._replicas:
            try:
                engine = self._connect(replica)
                reached += 1
                self._require_in_step(engine)
                replica.in_rotation, replica.reason = True, None
            except ReplicaNotInStepError as exc:
                replica.reason = str(exc)
            except EngineError as exc:
                replica.reason = f"unreachable at start: {exc}"
                errors.append(f"{replica.endpoint.base_url}: {exc}")
        if not reached:
            raise NoReplicaAvailableError("No replica answered: " + "; ".join(errors))
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._prober = threading.Thread(target=self._probe_loop, name="replica-prober", daemon=True)
        self._prober.start()

    # -- requests ---------------------------------------------------------------------------------------
    def chat(
        self, conversations: Sequence[Conversation], params: SamplingParams | None = None,
        adapter: AdapterChoices = ACTIVE,
    ) -> list[Generation]:
        """Answer each conversation on a replica in rotation (rows spread over them), on the adapter chosen
        when the call starts."""
        names = self._resolve(adapter, len(conversations))
        rows = list(conversations)
        return self._followed_by(self._map(
            lambda i: self._call([names[i]], lambda e: e.chat([rows[i]], params, adapter=names[i])[0]),
            range(len(rows)),
        ))

    def generate(
        self, prompts: Sequence[str], params: SamplingParams | None = None, adapter: AdapterChoices = ACTIVE,
    ) -> list[Generation]:
        """Continue each raw prompt on a replica in rotation (runtime replicas do not offer this)."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a sequence of strings, not one string")
        rows = list(prompts)
        names = self._resolve(adapter, len(rows))
        return self._followed_by(self._map(
            lambda i: self._call([names[i]], lambda e: e.generate([rows[i]], params, adapter=names[i])[0]),
            range(len(rows)),
        ))

    def stream_chat(
        self, conversation: Conversation, params: SamplingParams | None = None, adapter: AdapterChoice = ACTIVE,
    ) -> StreamResult:
        """Stream one answer from a replica in rotation; the adapter is fixed on the first ``next()``."""
        with self._lock:
            self._check_open()
            if adapter is not ACTIVE and not self.follower:
                self._name_of(adapter)
        return StreamResult(self._stream(conversation, params, adapter))

    def score(
        self, prompts: Sequence[str], completions: Sequence[str], adapter: AdapterChoices = ACTIVE,
    ) -> list[list[float]]:
        """Per-token log-probs from one replica in rotation (vLLM and SGLang offer them; runtime replicas raise
        :class:`~runtime.engines.http_errors.UnsupportedOperationError`)."""
        names = self._resolve(adapter, len(prompts))
        return self._call(names, lambda e: e.score(prompts, completions, adapter=names))

    def count_tokens(self, text: str) -> int:
        """Tokens in ``text``, counted by one replica in rotation."""
        return self._call([], lambda e: e.count_tokens(text))

    # -- adapters ---------------------------------------------------------------------------------------
    def load_adapter(self, name: str, path: str | Path, *, activate: bool = False, replace: bool = False) -> None:
        """Phase 1 of a promotion: load the adapter at ``path`` (readable by every replica) on every replica in
        rotation. The checksum sent to runtime replicas is ``checksum_of(path)``.

        A replica that fails to load it leaves rotation until it catches up (the probe retries); when none loads
        it, :class:`AdapterLoadError` says why for each and nothing changed.
        """
        location = str(path) if "://" in str(path) else str(Path(path).expanduser().resolve())
        checksum = self._checksum_of(location) if self._checksum_of is not None else None
        self.load_shared_adapter(name, location, checksum, activate=activate, replace=replace)

    def load_shared_adapter(
        self, name: str, location: str, checksum: str | None, *, activate: bool = False, replace: bool = False
    ) -> None:
        """:meth:`load_adapter` for an adapter at ``location`` (a path every replica can read, or an fsspec URL)
        with the checksum the registry recorded; runtime replicas verify it before loading.

        Raises:
            AdapterExistsError: ``name`` is loaded and ``replace`` is false.
            AdapterLoadError: no replica loaded it; nothing changed.
            NoReplicaAvailableError: no replica is in rotation.
        """
        if self.follower:
            raise follower_refusal(f"load adapter {name!r}")
        check_adapter_name(name)
        spec = _AdapterSpec(location, checksum)
        with self._admin:
            with self._lock:
                self._check_open()
                if name in self._adapters and not replace:
                    raise AdapterExistsError(
                        f"An adapter named {name!r} is already loaded; unload it first or pass replace=True."
                    )
                targets = [r for r in self._replicas if r.in_rotation]
            if not targets:
                raise NoReplicaAvailableError(self._none_in_rotation())
            outcomes = self._map(lambda r: self._try(lambda: self._load_on(r, name, spec)), targets)
            failed = [(r, exc) for r, exc in zip(targets, outcomes, strict=True) if exc is not None]
            if len(failed) == len(targets):
                for replica, exc in failed:
                    if _transport_failure(exc):
                        self._take_out(replica, f"unreachable while loading {name!r}: {exc}")
                raise AdapterLoadError(
                    f"No replica loaded adapter {name!r} from {location}; nothing changed. "
                    + " ".join(f"[{r.endpoint.base_url}] {exc}" for r, exc in failed)
                )
            with self._lock:
                self._adapters[name] = spec
                if activate:
                    self._active = name
            for replica, exc in failed:
                self._take_out(replica, f"missed adapter {name!r}: {exc}")
                self._leave_step(replica)
            if activate:
                self._propagate_active(name)

    def set_active_adapter(self, name: str | None) -> None:
        """Phase 2 of a promotion (or a rollback): requests that start from now on name ``name`` (``None``: the
        base model); it must have been loaded with :meth:`load_adapter`. Runtime replicas are told too, for
        traffic sent to them directly."""
        if self.follower:
            raise follower_refusal(f"switch the active adapter to {name!r}")
        with self._admin:
            with self._lock:
                self._check_open()
                if name is not None:
                    self._require(name)
                self._active = name
            self._propagate_active(name)

    @property
    def active_adapter(self) -> str | None:
        """The adapter requests that choose ``ACTIVE`` are sent to (``None``: the base model); for a follower, the
        adapter of the latest answer (or the default a replica reported when the set connected)."""
        return self._followed if self.follower else self._active

    def list_adapters(self) -> list[str]:
        """The adapters every replica in rotation has, in load order (a follower lists none: it names none)."""
        with self._lock:
            return list(self._adapters) if not self._closed else []

    def unload_adapter(self, name: str) -> None:
        """Stop naming ``name`` (if active, the base model becomes active), then unload it on the replicas."""
        if self.follower:
            raise follower_refusal(f"unload adapter {name!r}")
        with self._admin:
            with self._lock:
                self._check_open()
                self._require(name)
                del self._adapters[name]
                if self._active == name:
                    self._active = None
                reachable = [r for r in self._replicas if r.in_rotation and r.engine is not None]
            for replica in reachable:
                engine = replica.engine
                if engine is None or not engine.has_adapter(name):
                    continue
                try:
                    engine.unload_adapter(name)
                except EngineError as exc:  # it only stays loaded there; nothing names it any more
                    log.warning("could not unload %r from %s: %s", name, replica.endpoint.base_url, exc)

    # -- the replicas -----------------------------------------------------------------------------------
    def replicas(self) -> list[ReplicaStatus]:
        """Each replica's state: in rotation or not (and why), requests outstanding and served."""
        with self._lock:
            return self._statuses()

    def probe_now(self) -> None:
        """Probe the replicas out of rotation now instead of at the next interval."""
        self._wake.set()

    def wait_for(self, predicate: Callable[[list[ReplicaStatus]], bool], timeout: float | None = None) -> bool:
        """Block until ``predicate(self.replicas())`` holds (re-checked whenever a replica changes state);
        returns whether it did within ``timeout`` seconds."""
        with self._changed:
            return self._changed.wait_for(lambda: predicate(self._statuses()), timeout)

    def queue_depth(self) -> int | None:
        """Requests this set has sent and not yet had answered, over all replicas."""
        with self._lock:
            return sum(r.outstanding for r in self._replicas)

    def close(self) -> None:
        """Stop probing and close the connections; the replicas keep their adapters."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._changed.notify_all()
        self._stop.set()
        self._wake.set()
        self._prober.join(timeout=30)
        for engine in [*self._retired, *(r.engine for r in self._replicas if r.engine is not None)]:
            engine.close()

    # -- internals: requests ----------------------------------------------------------------------------
    def _resolve(self, adapter: AdapterChoices, n: int) -> list[AdapterChoice]:
        with self._lock:
            self._check_open()
            return resolve_per_row(adapter, n, self._name_of)

    def _name_of(self, adapter: AdapterChoice) -> AdapterChoice:
        if self.follower:  # the replica resolves it: ACTIVE is its default, set by the learner
            return adapter
        name = selected_adapter(adapter, self._active)
        if name is not None:
            self._require(name)
        return name

    def _require(self, name: str) -> _AdapterSpec:
        spec = self._adapters.get(name)
        if spec is None:
            raise UnknownAdapterError(name, list(self._adapters))
        return spec

    def _pick(self, tried: set[_Replica]) -> _Replica:
        """The replica in rotation, not yet tried, with the fewest outstanding requests (ties in turn)."""
        with self._lock:
            self._check_open()
            candidates = [r for r in self._replicas if r.in_rotation and r not in tried and r.engine is not None]
            if not candidates:
                raise NoReplicaAvailableError(self._none_in_rotation())
            turn = next(self._turn)
            n = len(self._replicas)
            replica = min(candidates, key=lambda r: (r.outstanding, (r.order - turn) % n))
            replica.outstanding += 1
            return replica

    def _followed_by(self, generations: list[Generation]) -> list[Generation]:
        if self.follower and generations:
            self._followed = generations[-1].adapter
        return generations

    def _call(self, names: Sequence[AdapterChoice], fn: Callable[[OpenAIHTTPEngine], _R]) -> _R:
        """``fn(engine)`` on a replica in rotation, for a call that names the adapters ``names``; a replica that
        cannot be reached or lacks one of them leaves rotation and the call moves to the next one."""
        tried: set[_Replica] = set()
        while True:
            replica = self._pick(tried)
            engine = replica.engine
            assert engine is not None
            try:
                result = fn(engine)
            except ServerConnectionError as exc:
                self._take_out(replica, f"unreachable: {exc}")
                tried.add(replica)
                continue
            except ReplicaNotInStepError as exc:
                self._take_out(replica, str(exc))
                tried.add(replica)
                continue
            except UnknownAdapterError as exc:
                if all(n is None for n in names):
                    raise
                self._take_out(replica, f"lost an adapter: {exc}")
                tried.add(replica)
                continue
            finally:
                with self._lock:
                    replica.outstanding -= 1
            with self._lock:
                replica.served += 1
            return result

    def _stream(self, conversation: Conversation, params: SamplingParams | None,
                adapter: AdapterChoice) -> Generator[str, None, Generation]:
        with self._lock:
            self._check_open()
            name = self._name_of(adapter)
        tried: set[_Replica] = set()
        while True:
            replica = self._pick(tried)
            engine = replica.engine
            assert engine is not None
            started = False
            try:
                with engine.stream_chat(conversation, params, adapter=name) as stream:
                    for delta in stream:
                        started = True
                        yield delta
                    with self._lock:
                        replica.served += 1
                    return self._followed_by([stream.generation])[0]
            except (ServerConnectionError, UnknownAdapterError, ReplicaNotInStepError) as exc:
                if isinstance(exc, UnknownAdapterError) and name is None:
                    raise
                self._take_out(replica, f"failed while streaming: {exc}")
                if started:
                    raise
                tried.add(replica)
            finally:
                with self._lock:
                    replica.outstanding -= 1

    def _map(self, fn: Callable[[_T], _R], items: Sequence[_T] | range) -> list[_R]:
        return map_concurrently(fn, items, 16, "replica-set")

    # -- internals: replicas and adapters ---------------------------------------------------------------
    def _connect(self, replica: _Replica) -> OpenAIHTTPEngine:
        """A fresh client for ``replica`` (it reads what the server has loaded now); checks the base model."""
        endpoint = replica.endpoint
        common = {"api_key": endpoint.api_key, "timeout": self._timeout, "connect_timeout": self._connect_timeout}
        engine: OpenAIHTTPEngine
        if endpoint.kind == "runtime":
            engine = RuntimeReplicaEngine(endpoint.base_url, checksum_of=self._checksum_of, follow=self.follower,
                                          **common)
        elif endpoint.kind == "vllm":
            engine = VLLMEngine(endpoint.base_url, **common)
        elif endpoint.kind == "sglang":
            engine = SGLangEngine(endpoint.base_url, **common)
        else:
            raise ValueError(f"Unknown replica kind {endpoint.kind!r}: use vllm, sglang or runtime.")
        if not self.model_name:
            self.model_name = engine.model_name
            self.context_length = engine.context_length
        elif engine.model_name != self.model_name:
            engine.close()
            raise EngineError(
                f"The replica at {endpoint.base_url} serves {engine.model_name!r}, the others {self.model_name!r}: "
                "every replica must serve the same base model. Restart it with that model."
            )
        if replica.engine is not None:  # requests may still run on it: closed with the set
            self._retired.append(replica.engine)
        replica.engine = engine
        if self.follower and isinstance(engine, RuntimeReplicaEngine) and self._followed is None:
            self._followed = engine.last_served
        return engine

    def _require_in_step(self, engine: OpenAIHTTPEngine) -> None:
        """For a follower: :class:`ReplicaNotInStepError` unless the learner has set the replica's default."""
        if self.follower and not engine.replica_info().get("in_step"):  # type: ignore[attr-defined]
            raise ReplicaNotInStepError(
                f"{engine.base_url} is not in step with the learner yet (no active adapter set there)"
            )

    def _leave_step(self, replica: _Replica) -> None:
        """Tell a runtime replica that missed a promotion to stop serving its default (best effort: one that
        cannot be reached serves nobody anyway)."""
        if isinstance(replica.engine, RuntimeReplicaEngine):
            try:
                replica.engine.leave_step()
            except EngineError as exc:
                log.info("could not take %s out of step: %s", replica.endpoint.base_url, exc)

    def _load_on(self, replica: _Replica, name: str, spec: _AdapterSpec) -> None:
        """(Re)load ``name`` on one replica: a runtime replica verifies ``spec.checksum`` first."""
        engine = replica.engine
        if engine is None:
            raise ServerConnectionError(f"{replica.endpoint.base_url} has not been reached yet")
        if isinstance(engine, RuntimeReplicaEngine):
            if spec.checksum is None:
                raise AdapterLoadError(
                    f"No checksum for adapter {name!r} at {spec.location}: runtime replicas verify one before "
                    "loading. Load it with load_shared_adapter(name, location, checksum)."
                )
            engine.load_verified(name, spec.location, spec.checksum, replace=True)
        else:
            engine.load_adapter(name, spec.location, replace=True)

    def _propagate_active(self, name: str | None) -> None:
        """Tell runtime replicas in rotation their new default adapter; one that fails leaves rotation."""
        self._in_charge = True
        with self._lock:
            runtime = [r for r in self._replicas if r.in_rotation and isinstance(r.engine, RuntimeReplicaEngine)]
        for replica in runtime:
            assert replica.engine is not None
            try:
                replica.engine.set_active_adapter(name)
            except EngineError as exc:
                self._take_out(replica, f"could not switch to {name!r}: {exc}")
                self._leave_step(replica)

    def _take_out(self, replica: _Replica, reason: str) -> None:
        with self._lock:
            was_in = replica.in_rotation
            replica.in_rotation, replica.reason = False, reason
            self._changed.notify_all()
        if was_in:
            log.warning("replica %s left rotation: %s", replica.endpoint.base_url, reason)
        self._wake.set()

    def _catch_up(self, replica: _Replica) -> None:
        """Bring one replica back: reconnect, load the active adapter, then the others, then rejoin (a follower
        only reconnects, and rejoins once the learner has brought the replica in step)."""
        try:
            # A follower keeps its client (it holds no adapter state; a restarted server is reached anew).
            engine = replica.engine if self.follower and replica.engine is not None else self._connect(replica)
            self._require_in_step(engine)
        except ReplicaNotInStepError as exc:
            with self._lock:
                replica.reason = str(exc)
            return
        except EngineError as exc:
            with self._lock:
                replica.reason = f"unreachable: {exc}"
            return
        if self.follower:
            with self._lock:
                replica.in_rotation, replica.reason = True, None
                self._changed.notify_all()
            log.info("replica %s is back in the follower's rotation", replica.endpoint.base_url)
            return
        with self._admin:  # no promotion changes the adapters while this replica is brought in step
            with self._lock:
                if self._closed:
                    return
                active = self._active
                wanted = sorted(self._adapters.items(), key=lambda item: item[0] != active)
            try:
                for name, spec in wanted:
                    self._load_on(replica, name, spec)
                if isinstance(replica.engine, RuntimeReplicaEngine):
                    replica.engine.set_active_adapter(active)
            except EngineError as exc:
                with self._lock:
                    replica.reason = f"catching up failed: {exc}"
                log.warning("replica %s could not catch up: %s", replica.endpoint.base_url, exc)
                return
            with self._lock:
                replica.in_rotation, replica.reason = True, None
                self._changed.notify_all()
        log.info("replica %s is back in rotation (active adapter %r)", replica.endpoint.base_url, active)

    def _probe_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._probe_interval_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            if self._in_charge:
                self._check_in_step()
            with self._lock:
                out = [r for r in self._replicas if not r.in_rotation]
            for replica in out:
                if self._stop.is_set():
                    return
                try:
                    self._catch_up(replica)
                except Exception:  # noqa: BLE001 - the prober must survive any one replica's failure
                    log.exception("probing replica %s failed", replica.endpoint.base_url)

    def _check_in_step(self) -> None:
        """Runtime replicas in rotation still serve the set's active adapter by default (one restarted between
        two requests has none): one that does not leaves rotation and is caught up like any other."""
        with self._admin:  # not while a promotion changes the replicas
            with self._lock:
                active, wanted = self._active, set(self._adapters)
                runtime = [r for r in self._replicas if r.in_rotation and isinstance(r.engine, RuntimeReplicaEngine)]
            for replica in runtime:
                if self._stop.is_set():
                    return
                assert isinstance(replica.engine, RuntimeReplicaEngine)
                try:
                    info = replica.engine.replica_info()
                except EngineError as exc:
                    self._take_out(replica, f"unreachable: {exc}")
                    continue
                loaded = {str(a.get("name")) for a in info.get("adapters") or ()}
                if not info.get("in_step") or info.get("active") != active or not wanted <= loaded:
                    self._take_out(replica, "not in step (restarted, or its adapters changed): catching up")

    def _statuses(self) -> list[ReplicaStatus]:
        return [ReplicaStatus(r.endpoint.base_url, r.endpoint.kind, r.in_rotation, r.reason, r.outstanding,
                              r.served) for r in self._replicas]

    def _none_in_rotation(self) -> str:
        reasons = "; ".join(f"{r.endpoint.base_url}: {r.reason}" for r in self._replicas)
        return f"No serving replica is in rotation ({reasons}). Start or fix one; it rejoins once it answers."

    @staticmethod
    def _try(fn: Callable[[], None]) -> EngineError | None:
        try:
            fn()
        except EngineError as exc:
            return exc
        return None


def _transport_failure(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a failure to reach the replica."""
    while exc is not None:
        if isinstance(exc, ServerConnectionError):
            return True
        exc = exc.__cause__  # type: ignore[assignment]
    return False
