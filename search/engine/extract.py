"""Phase 4 of a search (docs/architecture.md), the extraction pass: Ray tasks fill the evidence
cache for every image not in it yet (the expensive, knob-independent model work, once per image).

Also used by the re-ranking (the full pipeline's evidence) and by scoring a config
(:mod:`search.engine.scoring`)."""

from __future__ import annotations

import sys

from methods.base import OvssError
from search.core.errors import user_error

EXTRACT_RETRIES = 3   # Ray re-runs an extraction task whose worker died this many times


def _extract_task(ctx, item) -> tuple[bool, dict[str, str]]:
    from search.core.trial import extract_item

    return extract_item(ctx, item), where_am_i(ctx)


def extraction_pass(ctx, gpus: float, cpus: float) -> int:
    """Fill the evidence cache for every tuning image not already in it; returns how many."""
    import ray
    from tqdm import tqdm

    from search.core.cache import EvidenceCache

    cache = EvidenceCache(ctx.cache_dir)
    todo = [it for it in ctx.items if not cache.has(ctx.method, ctx.base_key(it))]
    cached = len(ctx.items) - len(todo)
    print(f"evidence cache {ctx.cache_dir}: {cached}/{len(ctx.items)} images cached",
          file=sys.stderr)
    if not todo:
        return 0
    # A worker that dies (SIGKILL, node lost, OOM kill) is retried by Ray; an exception the
    # task raises (a corrupt image, a missing checkpoint) is not: it is the user's to fix.
    task = ray.remote(_extract_task).options(num_cpus=cpus, num_gpus=gpus,
                                             max_retries=EXTRACT_RETRIES,
                                             retry_exceptions=False)
    import copy

    # Extraction runs the model on the extraction tasks' own device, not the trials'.
    ectx = copy.copy(ctx)
    ectx.device = "cuda" if gpus > 0 else "cpu"
    ctx_ref = ray.put(ectx)
    pending = [task.remote(ctx_ref, it) for it in todo]
    nodes: set[str] = set()
    with tqdm(total=len(pending), desc="extract", unit="img", file=sys.stderr) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                for _computed, where in ray.get(done):
                    if where.get("device_note") and where["node_id"] not in ctx.device_notes:
                        ctx.device_notes[where["node_id"]] = where["device_note"]
                        bar.write(f"warning: extraction on {where['device_note']}",
                                  file=sys.stderr)
                    nodes.add(where["node_id"])
            except Exception as e:
                for ref in pending:
                    ray.cancel(ref)
                # Let the cancelled tasks end (their cache writes clean up) before Ray stops.
                if pending:
                    ray.wait(pending, num_returns=len(pending), timeout=30)
                user = user_error(e)
                if user is not None:
                    raise OvssError(str(user)) from None
                raise
            bar.update(len(done))
    ctx.extract_nodes = sorted(nodes)
    return len(todo)


def where_am_i(ctx) -> dict[str, str]:
    """The Ray node (id and IP) and torch device this worker runs on: tagged on each child
    run, so a cluster search shows where its trials ran."""
    import ray

    from search.core.devices import worker_device

    rc = ray.get_runtime_context()
    dev = worker_device(ctx.device)
    where = {"node_id": rc.get_node_id(), "node_ip": ray.util.get_node_ip_address(),
             "device": dev.label}
    if dev.note:   # a GPU Ray assigned that torch cannot use: this worker runs on CPU
        where["device_note"] = dev.note
    return where
