"""The learner worker: training in a separate, low-priority process.

The parent sends a :class:`TrainJob`; a fresh ``spawn`` child lowers its priority, caps its CPU threads or
pins the chosen GPU, trains, and writes the adapter into the job's staging directory. Progress comes back
over a queue. If the child crashes or is killed, the parent raises :class:`TrainingFailed` with what is
known; the staging directory is never published (that is the caller's step, after verification).

A SEAL update (self-edit search, generator rounds and the serving candidate) runs the same way from a
:class:`SealJob` with :func:`run_seal_process`.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

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


def run_training_process(
    job: TrainJob, progress: ProgressFn | None = None, *, timeout_s: float | None = None
) -> dict[str, Any]:
    """Run `job` in a child process and return its result (metrics, timings); raises `TrainingFailed`."""
    from learners.registry import get_method

    if get_method(job.method).kind != "trainer":
        raise ValueError(f"{job.method!r} is not a method with a train function of its own")
    return _run_child(job, progress, timeout_s)


def run_seal_process(
    job: SealJob, progress: ProgressFn | None = None, *, timeout_s: float | None = None
) -> dict[str, Any]:
    """Run a SEAL update in a child process; returns ``SealResult.to_dict()``. Raises `TrainingFailed`.

    ``timeout_s`` kills the child (nothing is kept); ``settings["time_budget_s"]`` instead ends the self-edit
    search gracefully and still trains the candidate.
    """
    return _run_child(job, progress, timeout_s)


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


def run_call_process(job: CallJob, *, timeout_s: float | None = None) -> Any:
    """Run `job` in a child process and return the function's (picklable) result; raises `TrainingFailed`."""
    return _run_child(job, None, timeout_s)


_JOB_KINDS: dict[str, type] = {"train": TrainJob, "seal": SealJob, "call": CallJob}


def _run_child(job: TrainJob | SealJob | CallJob, progress: ProgressFn | None, timeout_s: float | None) -> Any:
    ctx = mp.get_context("spawn")
    messages: mp.Queue = ctx.Queue()
    kind = next(k for k, cls in _JOB_KINDS.items() if isinstance(job, cls))
    child = ctx.Process(target=_child_main, args=(kind, asdict(job), messages), name=f"learner-{job.method}")
    child.start()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    result: Any = None
    finished = started = False
    error: str | None = None
    try:
        while True:
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


def _child_main(kind: str, job_dict: dict[str, Any], messages: mp.Queue) -> None:
    _die_with_parent()
    messages.put(("started", os.getpid()))
    job = _JOB_KINDS[kind](**job_dict)
    try:
        _lower_priority(job.niceness)
        if job.device == "cpu":
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        elif job.device.startswith("cuda:"):
            os.environ["CUDA_VISIBLE_DEVICES"] = job.device.split(":", 1)[1]
        _quiet_libraries()
        import torch

        torch.set_num_threads(job.num_threads or learner_cpu_threads())
        run = {"train": _train, "seal": _seal, "call": _call}[kind]
        result = run(job, lambda step, total, logs: messages.put(("progress", (step, total, logs))))
        messages.put(("done", result))
    except BaseException:
        messages.put(("error", traceback.format_exc(limit=8)))
        raise SystemExit(1) from None


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
    """The job's anchors, answered by the model the update starts from (base + parent adapter), for the learner.

    Returns ``(AnchorTraining or None, the answered anchors as dicts)``; the caller keeps the answers so that a
    repair attempt does not write them again.
    """
    if not job.anchors:
        return None, []
    from learners.anchor_loss import AnchorTraining
    from learners.anchors import Anchor, answer_anchors

    anchors = [Anchor(**a) for a in job.anchors]
    options = dict(job.anchor_settings)
    if any(a.answer_ids is None for a in anchors):
        from peft import PeftModel

        from learners.lora import load_base_model, load_tokenizer

        model: Any = load_base_model(job.base_model_dir)
        if job.parent_adapter_dir is not None:
            model = PeftModel.from_pretrained(model, job.parent_adapter_dir)
        answer_anchors(model, load_tokenizer(job.base_model_dir), anchors,
                       max_new_tokens=int(options.get("max_new_tokens", 64)))
        del model
    training = AnchorTraining(
        anchors, loss=options.get("loss", "sft"), weight=float(options.get("weight", 1.0)),
        batch_size=int(options.get("batch_size", 4)),
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
