"""Phase 4b of a cost-aware search (docs/architecture.md, docs/cost.md), the cost probe: one Ray
task on the extraction resources (the device that runs the model) times ``extract`` on a few
tuning images, or reads that measurement from the cost cache
(:func:`search.core.trial.extraction_cost`). Each trial then adds its own ``extend`` and
``decode`` seconds (:func:`search.core.trial.evaluate`)."""

from __future__ import annotations

import copy
from typing import Any

from methods.base import OvssError
from search.core.errors import user_error

PROBE_RETRIES = 3   # Ray re-runs a probe whose worker died (as an extraction task)


def _probe_task(ctx) -> dict[str, Any]:
    from search.core.trial import extraction_cost

    return extraction_cost(ctx)


def measure_extraction(ctx, gpus: float, cpus: float) -> dict[str, Any]:
    """``{"seconds", "samples", "device_kind", "cached"}`` of ``extract`` per image on the
    extraction device (``gpus`` > 0: CUDA), measured once per extraction setting and device
    kind."""
    import ray

    ectx = copy.copy(ctx)
    ectx.device = "cuda" if gpus > 0 else "cpu"
    task = ray.remote(_probe_task).options(num_cpus=cpus, num_gpus=gpus,
                                           max_retries=PROBE_RETRIES, retry_exceptions=False)
    try:
        return ray.get(task.remote(ectx))
    except Exception as e:
        user = user_error(e)
        if user is not None:
            raise OvssError(str(user)) from None
        raise
