"""Two-stage search: tune with a method's cheaper ``proxy`` pipeline, re-rank the best trials with
the full one (``python -m search.run --rerank-top K``).

A method YAML may declare ``proxy: {settings: {...}, set: {...}}``: settings and fixed knob
values for the search stage (PnP-OVSS: ``drop_iters: 1``, ``crf: false``, as the reference
tunes it, so one pass per image serves every trial). With ``--rerank-top K``:

1. the search runs as usual, but every trial decodes with the proxy (``proxy_context``);
2. the K best proxy trials (among those scored on every image) are re-scored with the full
   pipeline (the method's own settings and defaults, what inference runs) on all tuning images,
   one Ray task per trial through :func:`search.core.trial.evaluate` / ``evidence_for``, after an
   extraction pass for the full settings (skipped where the evidence is cached);
3. the winner is the best full score among those K (ties: the better proxy rank); its params and
   full score go into ``best_config.yaml`` (and so into the export).

On the parent run: ``rerank_spearman`` / ``rerank_kendall`` (proxy vs full rank correlation over
the K re-scored trials; NaN for K < 3 or constant scores), ``rerank_regret`` (full score of the
best re-ranked trial minus that of the proxy's pick, >= 0: what re-ranking bought),
``rerank_full_score`` / ``rerank_proxy_score`` (one step per proxy rank), tags
``ovss_rerank_top`` and ``ovss_proxy``, and ``rerank.yaml`` (the table). The correlations and the
regret are those of :func:`rewards.fidelity.fidelity_report`, with the proxy score in the place
of the label-free reward and the full score in the place of mIoU.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from methods.base import OvssError


def proxy_context(ctx, proxy):
    """The search context of the proxy stage: ``ctx`` with the proxy's settings and knob values
    on top (a different settings key, so its evidence never mixes with the full pipeline's)."""
    from search.core.trial import settings_key

    out = dataclasses.replace(ctx, settings={**ctx.settings, **proxy.settings},
                              defaults={**ctx.defaults, **proxy.set})
    out.settings_key = settings_key(out)
    return out


def top_rows(rows: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """The ``k`` best proxy trials among those scored on the most images (ASHA's survivors),
    best first; ties keep the trial order."""
    if not rows:
        raise OvssError("--rerank-top: no trial reported a score")
    most = max(r["images"] for r in rows)
    full = [r for r in rows if r["images"] == most]
    return sorted(full, key=lambda r: -r["score"])[:k]


def _full_score(ctx, params: dict[str, Any]) -> dict[str, Any]:
    """Ray task: the full pipeline's score of ``params`` (searched knobs) on every image."""
    from search.core.trial import evaluate

    return evaluate(ctx, params, lambda _r: None)


def rescore(ctx, params_list: list[dict[str, Any]], gpus: float, cpus: float
            ) -> list[dict[str, Any]]:
    """Full-pipeline results of every entry of ``params_list`` (Ray tasks, in parallel)."""
    import ray

    from search.core.errors import user_error
    from search.engine.extract import extraction_pass

    full = dataclasses.replace(ctx, rungs=[len(ctx.items)])
    extraction_pass(full, gpus, cpus)
    task = ray.remote(_full_score).options(num_cpus=cpus, num_gpus=gpus, max_retries=0)
    ref = ray.put(full)
    try:
        return ray.get([task.remote(ref, p) for p in params_list])
    except Exception as e:
        user = user_error(e)
        if user is not None:
            raise OvssError(f"re-ranking: {user}") from None
        raise


def rerank_report(proxy_scores: list[float], full_scores: list[float]) -> dict[str, float]:
    """Proxy-vs-full agreement of the re-ranked trials (in proxy rank order)."""
    from rewards.fidelity import fidelity_report

    rep = fidelity_report(proxy_scores, full_scores)
    return {"rerank_spearman": rep["fidelity_spearman"], "rerank_kendall": rep["fidelity_kendall"],
            "rerank_regret": rep["fidelity_regret_miou"], "rerank_trials": rep["fidelity_trials"]}


def pick_winner(results: list[dict[str, Any]]) -> int:
    """Index of the best full score (the earliest, i.e. the better proxy rank, on ties)."""
    import numpy as np

    from rewards.fidelity import first_argmax

    return first_argmax(np.asarray([float(r["score"]) for r in results]))


def rerank(client, parent_id: str, plan, ctx, results) -> dict[str, Any]:
    """Stage 2 (module docstring): re-score the ``plan.rerank_top`` best proxy trials with the
    full pipeline of ``ctx``, log the agreement on the parent run and return the winner as a
    ``best_result`` row (score = full score on all tuning images) plus ``record`` (for
    best_config.yaml) and ``summary`` (one line for the CLI)."""
    import yaml

    from rewards.fidelity import undefined_reason
    from search.engine.tuning import best_result
    from search.record import tracking

    _, rows = best_result(results, list(plan.resolved.space))
    top = top_rows(rows, plan.rerank_top)
    args = plan.args
    full = rescore(ctx, [t["params"] for t in top], args.gpus_per_trial, args.cpus_per_trial)
    proxy_scores = [float(t["score"]) for t in top]
    full_scores = [float(r["score"]) for r in full]
    report = rerank_report(proxy_scores, full_scores)
    why = undefined_reason(proxy_scores, full_scores, ("the proxy score", "the full score"))
    tracking.log_metrics(client, parent_id, report, 0,
                         why={k: why for k in ("rerank_spearman", "rerank_kendall")})
    for i, (p, f) in enumerate(zip(proxy_scores, full_scores)):
        tracking.log_metrics(client, parent_id, {"rerank_proxy_score": p,
                                                 "rerank_full_score": f}, i)
    proxy = plan.proxy.model_dump()
    client.set_tag(parent_id, "ovss_rerank_top", str(plan.rerank_top))
    client.set_tag(parent_id, "ovss_proxy", json.dumps(proxy, sort_keys=True, default=str))
    table = [{"proxy_rank": i, "trial_id": t["trial_id"], "params": t["params"],
              "proxy_score": p, "full_score": f}
             for i, (t, p, f) in enumerate(zip(top, proxy_scores, full_scores))]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "rerank.yaml"
        path.write_text(yaml.safe_dump({"proxy": proxy, "report": report, "trials": table},
                                       sort_keys=False))
        client.log_artifact(parent_id, str(path))
    w = pick_winner(full)
    win = top[w]
    ranks = (f"rank correlation undefined ({why})" if why else
             f"spearman={report['rerank_spearman']:.3f} kendall={report['rerank_kendall']:.3f}")
    summary = (f"rerank: top {len(top)} proxy trials re-scored with the full pipeline on "
               f"{len(ctx.items)} images: {ranks}, regret {100 * report['rerank_regret']:.2f} "
               f"points; full scores (%) {[round(100 * f, 2) for f in full_scores]} (proxy "
               f"{[round(100 * p, 2) for p in proxy_scores]}); winner: proxy rank {w}")
    print(summary, file=sys.stderr)
    record = {"top": plan.rerank_top, "proxy": proxy, "proxy_score": proxy_scores[w],
              "proxy_rank": w, **{k: float(v) for k, v in report.items()}}
    return {"score": full_scores[w], "images": len(ctx.items), "params": win["params"],
            "metrics": {k: v for k, v in full[w].items() if isinstance(v, (int, float))},
            "trial_id": win["trial_id"], "record": record, "summary": summary}
