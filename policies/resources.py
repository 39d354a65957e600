"""Is the machine spare enough to learn now, and on which device?"""

from __future__ import annotations

import os

from learners.worker import pick_training_device
from policies.schema import Resources


def training_device(
    resources: Resources, serving_device: str | None, *, spare_only: bool = True
) -> tuple[str | None, str]:
    """``(device, why)``: where a cycle may train now, or ``(None, why not)`` when nothing is spare.

    ``auto`` takes a GPU with ``min_free_gpu_mib`` free and at most ``max_gpu_utilization`` % busy that is
    not the serving one; on a machine without CUDA it takes the CPU. A device named explicitly is used as
    configured. A busy CPU (1-minute load average per
    core above ``max_cpu_load``) is not spare. With ``spare_only=False`` (a cycle an operator asked for) the
    thresholds are ignored: any GPU but the serving one, else the CPU.
    """
    device = resources.device
    if device == "auto":
        picked = pick_training_device(
            serving_device,
            min_free_gib=resources.min_free_gpu_mib / 1024 if spare_only else 0.0,
            max_utilization=int(resources.max_gpu_utilization) if spare_only else 100,
        )
        if picked == "cpu" and spare_only and _has_cuda():
            return None, "no GPU is spare (free memory or utilization past the policy's limits)"
        device = picked
    if device == "cpu" and spare_only and resources.max_cpu_load is not None:
        per_core = os.getloadavg()[0] / (os.cpu_count() or 1)
        if per_core > resources.max_cpu_load:
            return None, f"CPU load {per_core:.2f} per core is above max_cpu_load {resources.max_cpu_load}"
    return device, f"training on {device}"


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
