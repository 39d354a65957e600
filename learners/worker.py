"""The learner worker: training in a separate, low-priority process.

The parent sends a :class:`TrainJob`; a fresh ``spawn`` child lowers its priority, caps its CPU threads or
pins the chosen GPU, trains, and writes the adapter into the job's staging directory. Progress comes back
over a queue. A job whose last inputs the parent still computes (the anchors the serving engine answers) is
run with ``prepare``: the child starts and imports its libraries meanwhile, then takes the prepared job. If the
child crashes or is killed, the parent raises :class:`TrainingFailed` with what is
known; the staging directory is never published (that is the caller's step, after verification).

A SEAL update (self-edit search, generator rounds and the serving candidate) runs the same way from a
:class:`SealJob` with :func:`run_seal_process`.

Where a job runs is a :class:`JobExecutor`: :class:`LocalProcessExecutor` (the child process above, the default)
or ``learners.ray_executor.RayExecutor`` (a task on a Ray cluster). The ``run_*`` functions take one, or use the
one set for the current context by :func:`use_executor` (which a learning cycle sets from ``learning.executor``).
Wherever it runs, a job whose model or adapter directories are fsspec URLs reads local copies of them (adapters
verified by checksum, see :func:`runtime.adapters.fetch_adapter`).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import multiprocessing as mp
import os
import queue as queue_mod
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from runtime import shared_storage
from runtime.cpu import learner_cpu_threads
from runtime.processes import MAIN_GUARD_HINT

ProgressFn = Callable[[int, int, dict[str, float]], None]


class TrainingFailed(RuntimeError):
    """The training process failed, crashed or was killed; nothing was published."""


@dataclass
class TrainJob:
    """Everything the child needs, as plain data (it crosses a process boundary)."""

    method: str
    """A ``trainer`` method of :data:`learners.registry.LEARNING_METHODS` (``sft`` for ``texts``)."""
    base_model_dir: str
    examples: list[dict[str, Any]]
    output_dir: str
    settings: dict[str, Any] = field(default_factory=dict)
    lora: dict[str, Any] = field(default_factory=dict)
    parent_adapter_dir: str | None = None
    device: str = "cpu"
    num_threads: int | None = None
    niceness: int = 10
    anchors: list[dict[str, Any]] = field(default_factory=list)
    """``Anchor.to_dict()`` rows; those without ``answer_ids`` are answered by the parent (active) model first."""
    anchor_settings: dict[str, Any] = field(default_factory=dict)
    """``loss``, ``weight``, ``batch_size`` and ``max_new_tokens`` of ``learning.anchors``."""
    texts: list[str | list[int]] = field(default_factory=list)
    """``method="sft"`` on plain text sequences instead of ``examples`` (a SEAL candidate trained again); see
    :data:`learners.examples.TrainingText`."""
    parent_adapter_checksum: str | None = None
    """The registry checksum of the parent adapter, verified when ``parent_adapter_dir`` is a URL (none: the one in
    its ``lineage.json``)."""


@dataclass
class SealJob:
    """A SEAL update for the child (see :func:`learners.seal.run_seal_update`), as plain data.

    ``documents`` are ``SealDocument.to_dict()`` rows; ``settings`` is ``SEALSettings.to_dict()`` or the YAML
    ``learning.seal`` mapping; ``replay_examples`` holds plain texts or ``DemoExample`` dicts.
    """

    base_model_dir: str
    documents: list[dict[str, Any]]
    output_dir: str
    generator_output_dir: str
    settings: dict[str, Any] = field(default_factory=dict)
    parent_adapter_dir: str | None = None
    generator_adapter_dir: str | None = None
    replay_examples: list[Any] = field(default_factory=list)
    device: str = "cpu"
    num_threads: int | None = None
    niceness: int = 10
    method: str = "seal"
    anchors: list[dict[str, Any]] = field(default_factory=list)
    anchor_settings: dict[str, Any] = field(default_factory=dict)
    parent_adapter_checksum: str | None = None


def pick_training_device(
    serving_device: str | None = None,
    *,
    min_free_gib: float = 4.0,
    max_utilization: int = 50,
    allow_serving_device: bool = False,
) -> str:
    """A CUDA device with enough free memory and low utilisation, never the serving one unless allowed;
    ``"cpu"`` when there is none."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return "cpu"
    if not torch.cuda.is_available():
        return "cpu"
    best: tuple[float, str] | None = None
    for index in range(torch.cuda.device_count()):
        name = f"cuda:{index}"
        if not allow_serving_device and serving_device in (name, "cuda" if index == 0 else None):
            continue
        free, _total = torch.cuda.mem_get_info(index)
        free_gib = free / 2**30
        try:
            busy = torch.cuda.utilization(index)
        except Exception:  # needs pynvml; without it, judge by memory alone
            busy = 0
        if free_gib >= min_free_gib and busy <= max_utilization and (best is None or free_gib > best[0]):
            best = (free_gib, name)
    return best[1] if best else "cpu"


PrepareFn = Callable[[TrainJob], None]
"""Fills in a job's last inputs in place (the cycle's anchors, answered by the serving engine)."""


def run_training_process(
    job: TrainJob, progress: ProgressFn | None = None, *, timeout_s: float | None = None,
    executor: JobExecutor | None = None, prepare: PrepareFn | None = None,
) -> dict[str, Any]:
    """Run `job` in a worker (`executor`, default :func:`current_executor`) and return its result (metrics,
    timings); raises `TrainingFailed`.

    `prepare`, when given, fills in the job's last inputs first. A local worker is started before it runs and
    imports its libraries meanwhile (seconds on a CPU), then takes the finished job; other executors get the job
    once it is prepared.
    """
    from learners.registry import get_method

    if get_method(job.method).kind != "trainer":
        raise ValueError(f"{job.method!r} is not a method with a train function of its own")
    executor = executor or current_executor()
    if isinstance(executor, LocalProcessExecutor):
        return executor.run(job, progress, timeout_s, prepare=prepare)
    if prepare is not None:
        prepare(job)
    return executor.run(job, progress, timeout_s)


def run_seal_process(
    job: SealJob, progress: ProgressFn | None = None, *, timeout_s: float | None = None,
    executor: JobExecutor | None = None,
) -> dict[str, Any]:
    """Run a SEAL update in a worker; returns ``SealResult.to_dict()``. Raises `TrainingFailed`.

    ``timeout_s`` kills the worker (nothing is kept); ``settings["time_budget_s"]`` instead ends the self-edit
    search gracefully and still trains the candidate.
    """
    return (executor or current_executor()).run(job, progress, timeout_s)


@dataclass
class CallJob:
    """Call ``target`` (``"module:function"``, taking ``**kwargs``) in a worker process: evaluation work
    that must not load models or set torch threads in the serving process."""

    method: str
    target: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    num_threads: int | None = None
    niceness: int = 10


def run_call_process(job: CallJob, *, timeout_s: float | None = None, executor: JobExecutor | None = None) -> Any:
    """Run `job` in a worker and return the function's (picklable) result; raises `TrainingFailed`."""
    return (executor or current_executor()).run(job, None, timeout_s)


Job = TrainJob | SealJob | CallJob
JOB_KINDS: dict[str, type] = {"train": TrainJob, "seal": SealJob, "call": CallJob}


def job_kind(job: Job) -> str:
    """``train``, ``seal`` or ``call``: the key of `job`'s class in :data:`JOB_KINDS`."""
    return next(k for k, cls in JOB_KINDS.items() if isinstance(job, cls))


class JobExecutor(Protocol):
    """Runs a job somewhere and returns its result, raising :class:`TrainingFailed` when the job fails, crashes or
    runs past `timeout_s`. Nothing it produces is published: the caller verifies and publishes the output."""

    name: str

    def run(self, job: Job, progress: ProgressFn | None, timeout_s: float | None) -> Any: ...


class LocalProcessExecutor:
    """Each job in a fresh ``spawn`` child process of this one, at lower priority (the default executor).

    Progress is reported step by step; the child ends when this process does.
    """

    name = "local"

    def run(
        self, job: Job, progress: ProgressFn | None, timeout_s: float | None, *, prepare: PrepareFn | None = None
    ) -> Any:
        """Run `job` in a fresh child; with `prepare` (a :class:`TrainJob`'s), the child starts and imports its
        libraries while `prepare` fills in the job here, then takes the job."""
        return _run_child(job, progress, timeout_s, prepare)


_EXECUTOR: contextvars.ContextVar[JobExecutor | None] = contextvars.ContextVar("learner_executor", default=None)
_CANCEL: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar("learner_cancel", default=None)

CANCELLED_MESSAGE = "cancelled: the runtime is stopping; nothing was published and the signals stay for the next cycle"


def cancel_requested() -> bool:
    """Whether the jobs of this context were cancelled (:func:`cancelled_by`): an executor polls it while it waits."""
    event = _CANCEL.get()
    return event is not None and event.is_set()


@contextlib.contextmanager
def cancelled_by(event: threading.Event) -> Iterator[None]:
    """Local jobs started in this context (thread) end soon after `event` is set: the child process is killed and
    the job raises :class:`TrainingFailed` (nothing is published). How a stopping server stops a running cycle."""
    token = _CANCEL.set(event)
    try:
        yield
    finally:
        _CANCEL.reset(token)


def current_executor() -> JobExecutor:
    """The executor set by :func:`use_executor` in this context, else a :class:`LocalProcessExecutor`."""
    return _EXECUTOR.get() or LocalProcessExecutor()


@contextlib.contextmanager
def use_executor(executor: JobExecutor) -> Iterator[JobExecutor]:
    """Run every job started in this context (thread or task) with `executor`, including those a learning method
    starts itself (``auto`` candidates and their evaluation, SEAL)."""
    token = _EXECUTOR.set(executor)
    try:
        yield executor
    finally:
        _EXECUTOR.reset(token)


def _run_child(
    job: Job, progress: ProgressFn | None, timeout_s: float | None, prepare: PrepareFn | None = None
) -> Any:
    ctx = mp.get_context("spawn")
    messages: mp.Queue = ctx.Queue()
    prepared: mp.Queue | None = ctx.Queue() if prepare is not None else None
    kind = job_kind(job)
    child = ctx.Process(
        target=_child_main, args=(kind, asdict(job), messages, prepared), name=f"learner-{job.method}"
    )
    child.start()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    if prepare is not None and prepared is not None:
        try:
            prepare(job)
        except BaseException:
            child.kill()
            child.join()
            raise
        prepared.put(asdict(job))
    result: Any = None
    finished = started = False
    error: str | None = None
    try:
        while True:
            if cancel_requested():
                child.kill()
                raise TrainingFailed(CANCELLED_MESSAGE)
            try:
                kind, payload = messages.get(timeout=0.5)
            except queue_mod.Empty:
                if not child.is_alive():
                    break
                if deadline is not None and time.monotonic() > deadline:
                    child.kill()
                    raise TrainingFailed(f"training exceeded its time budget of {timeout_s:.0f}s") from None
                continue
            if kind == "started":
                started = True
            elif kind == "progress" and progress is not None:
                progress(*payload)
            elif kind == "done":
                result, finished = payload, True
            elif kind == "error":
                error = payload
    finally:
        child.join(timeout=30)
        if child.is_alive():
            child.kill()
            child.join()
    if error is not None:
        raise TrainingFailed(f"{job.method} training failed:\n{error}")
    if not started and child.exitcode not in (0, None) and child.exitcode > 0:
        raise TrainingFailed(
            f"the {job.method} worker process exited with code {child.exitcode} before it started the job. If this "
            f"happened in a script: {MAIN_GUARD_HINT} Its own error is above, on stderr."
        )
    if not finished or child.exitcode != 0:
        raise TrainingFailed(
            f"{job.method} training process exited with code {child.exitcode} before finishing "
            "(killed, out of memory, or crashed); nothing was published"
        )
    return result


def _die_with_parent() -> None:
    """End this worker the moment its parent process ends (a killed server must not leave a worker training on
    under PID 1, writing into a staging directory a restart has already cleaned)."""
    parent = mp.parent_process()
    if parent is None:
        return

    def watch() -> None:
        parent.join()  # returns when the parent's sentinel closes: the parent is gone
        os._exit(70)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def _child_main(kind: str, job_dict: dict[str, Any], messages: mp.Queue, prepared: mp.Queue | None = None) -> None:
    _die_with_parent()
    messages.put(("started", os.getpid()))
    job = JOB_KINDS[kind](**job_dict)
    try:
        _lower_priority(job.niceness)
        if prepared is not None:  # import while the parent prepares the job, then take the prepared job
            _warm_up(job)
            job = JOB_KINDS[kind](**prepared.get())
        result = execute_job(job, lambda step, total, logs: messages.put(("progress", (step, total, logs))))
        messages.put(("done", result))
    except BaseException:
        messages.put(("error", traceback.format_exc(limit=8)))
        raise SystemExit(1) from None


def execute_job(job: Job, progress: ProgressFn) -> Any:
    """Run `job` in this process (a worker: it sets this process's visible GPUs and torch threads) and return its
    result. URL inputs are read from local copies first (:func:`localize_inputs`)."""
    _use_device(job)
    localize_inputs(job)
    kind = job_kind(job)
    return {"train": _train, "seal": _seal, "call": _call}[kind](job, progress)


def _use_device(job: Job) -> None:
    """This worker's visible GPUs (before torch is first imported) and torch threads, for `job`."""
    if job.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    elif job.device.startswith("cuda:"):
        os.environ["CUDA_VISIBLE_DEVICES"] = job.device.split(":", 1)[1]
    _quiet_libraries()
    import torch

    torch.set_num_threads(job.num_threads or learner_cpu_threads())


def _warm_up(job: Job) -> None:
    """Import what `job` will run (torch, and for a training job its method's trainer with TRL)."""
    _use_device(job)
    if isinstance(job, TrainJob):
        from learners import anchor_loss  # noqa: F401
        from learners.registry import get_method

        get_method(job.method).load_trainer()


_URL_INPUTS = {"train": ("parent_adapter_dir",), "seal": ("parent_adapter_dir", "generator_adapter_dir")}
"""Adapter inputs of each job kind; ``base_model_dir`` is an input of every kind (a ``CallJob``'s in ``kwargs``)."""


def localize_inputs(job: Job, cache_dir: str | Path | None = None) -> None:
    """Replace the job's input directories that are fsspec URLs by local copies, in place: adapters through
    :func:`runtime.adapters.fetch_adapter` (checksum verified; the parent against ``parent_adapter_checksum`` when
    set), the base model through a cached download. `cache_dir` defaults to ``<runtime cache>/fetched``."""
    from runtime.adapters import fetch_adapter
    from runtime.models import default_cache_dir

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "fetched"
    kind = job_kind(job)
    fields: dict[str, Any] = job.kwargs if isinstance(job, CallJob) else job.__dict__
    for name in ("base_model_dir", "parent_adapter_dir") if isinstance(job, CallJob) else _URL_INPUTS[kind]:
        url = fields.get(name)
        if shared_storage.is_url(url):
            checksum = getattr(job, "parent_adapter_checksum", None) if name == "parent_adapter_dir" else None
            fields[name] = str(fetch_adapter(url, checksum, cache / "adapters"))
    base = fields.get("base_model_dir")
    if shared_storage.is_url(base):
        key = hashlib.sha256(base.encode()).hexdigest()[:12]
        fields["base_model_dir"] = str(shared_storage.cached_download(base, cache / "models" / key))


def _quiet_libraries() -> None:
    """Progress goes back over the queue: keep the libraries' own bars and notices off the parent's terminal."""
    import warnings

    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)


def _lower_priority(niceness: int) -> None:
    try:
        os.nice(niceness)
    except (AttributeError, OSError):  # not on this platform / not permitted: train anyway
        pass


def _anchor_training(job: TrainJob | SealJob) -> tuple[Any, list[dict[str, Any]]]:
    """The job's anchors with their answers as token ids, for the learner: an answer the serving engine wrote as
    text is tokenised here; an anchor without one is answered by the model the update starts from (base + parent
    adapter).

    Returns ``(AnchorTraining or None, the answered anchors as dicts)``; the caller keeps the answers so that a
    repair attempt does not write them again.
    """
    if not job.anchors:
        return None, []
    from learners.anchor_loss import AnchorTraining
    from learners.anchors import Anchor, answer_anchors, tokenise_answers
    from learners.lora import load_tokenizer
    from runtime.config import AnchorsConfig

    anchors = [Anchor(**a) for a in job.anchors]
    options = AnchorsConfig.model_validate(job.anchor_settings)  # learning.anchors' defaults for what is unset
    max_new_tokens = options.max_new_tokens
    if any(a.answer_ids is None for a in anchors):
        tokenizer = load_tokenizer(job.base_model_dir)
        tokenise_answers(tokenizer, anchors, max_new_tokens=max_new_tokens)  # answered by the serving engine as text
    if any(a.answer_ids is None for a in anchors):
        from peft import PeftModel

        from learners.lora import load_base_model

        model: Any = load_base_model(job.base_model_dir)
        if job.parent_adapter_dir is not None:
            model = PeftModel.from_pretrained(model, job.parent_adapter_dir)
        answer_anchors(model, tokenizer, anchors, max_new_tokens=max_new_tokens)
        del model
    training = AnchorTraining(
        anchors, loss=options.loss, weight=options.weight, batch_size=options.batch_size, balance=options.balance
    )
    return training, [a.to_dict() for a in anchors]


def _train(job: TrainJob, progress: ProgressFn) -> dict[str, Any]:
    from learners.examples import DemoExample
    from learners.lora_config import LoraSettings
    from learners.registry import get_method

    lora = LoraSettings(**job.lora)
    start = time.perf_counter()
    anchors, answered = _anchor_training(job)
    anchor_seconds = time.perf_counter() - start
    method = get_method(job.method)
    settings = method.settings({"use_cpu": job.device == "cpu", **job.settings})
    if job.texts:
        from learners.sft_trainer import train_sft_texts

        out = train_sft_texts(
            job.base_model_dir, job.texts, job.output_dir, settings, lora, job.parent_adapter_dir, progress,
            anchors=anchors,
        )
    else:
        examples = [DemoExample(**e) for e in job.examples]
        out = method.load_trainer()(
            job.base_model_dir, examples, job.output_dir, settings, lora, job.parent_adapter_dir, progress,
            anchors=anchors,
        )
    summary = dict(out.summary)
    if answered:
        summary.update(anchors=len(answered), anchor_answer_seconds=anchor_seconds)
    return {
        "train_seconds": out.train_seconds + anchor_seconds,
        "num_examples": out.num_examples,
        "num_steps": out.num_steps,
        "summary": summary,
        "history": out.metrics,
        "anchors": answered,
    }


def _call(job: CallJob, progress: ProgressFn) -> Any:
    import importlib

    module, _, name = job.target.partition(":")
    return getattr(importlib.import_module(module), name)(**job.kwargs)


def _seal(job: SealJob, progress: ProgressFn) -> dict[str, Any]:
    from learners.seal import SealDocument, run_seal_update

    anchors, answered = _anchor_training(job)
    result = run_seal_update(
        job.base_model_dir,
        [SealDocument(**d) for d in job.documents],
        job.settings,
        output_dir=job.output_dir,
        generator_output_dir=job.generator_output_dir,
        parent_adapter_dir=job.parent_adapter_dir,
        generator_adapter_dir=job.generator_adapter_dir,
        replay_examples=job.replay_examples,
        progress=progress,
        device="cpu" if job.device == "cpu" else "cuda",  # the chosen GPU is the only one visible here
        anchors=anchors,
    )
    return {**result.to_dict(), "anchors": answered}
