"""Runs a validated :class:`search.run.Plan`: Ray, the extraction pass, Ray Tune and MLflow."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from methods.base import OvssError


def _init_ray(address: str | None) -> bool:
    """Start or join Ray. Returns True when this call started it (and so should stop it)."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                          "configure_logging": False}
    try:
        if address:
            ray.init(address=address, **kw)
        else:
            ray.init(**kw)
    except Exception as e:  # ConnectionError, RuntimeError, ...
        where = f"at --address {address}" if address else "locally"
        raise OvssError(f"cannot start Ray {where}: {str(e).splitlines()[0]}") from None
    return True


def check_resources(gpus_per_trial: float, cpus_per_trial: float) -> None:
    import ray

    res = ray.cluster_resources()
    if gpus_per_trial > 0 and res.get("GPU", 0) < gpus_per_trial:
        raise OvssError(f"--gpus-per-trial {gpus_per_trial:g} asked for, but the Ray cluster has "
                        f"{res.get('GPU', 0):g} GPU(s)")
    if res.get("CPU", 0) < cpus_per_trial:
        raise OvssError(f"--cpus-per-trial {cpus_per_trial:g} asked for, but the Ray cluster has "
                        f"{res.get('CPU', 0):g} CPU(s)")


def run_search(plan) -> str:
    import ray
    from mlflow.tracking import MlflowClient

    from methods import get_segmenter_class
    from search import tracking
    from search.trial import SearchContext

    args = plan.args
    r = plan.resolved
    started = _init_ray(args.address)
    try:
        check_resources(args.gpus_per_trial, args.cpus_per_trial)
        device = "cuda" if args.gpus_per_trial > 0 else "cpu"
        seg_cls = get_segmenter_class(r.method)
        ctx = SearchContext(
            method=r.method, backbone=r.backbone, settings=r.settings, defaults=r.defaults,
            classes=plan.classes.to_dict(), dataset=plan.data_kwargs, items=plan.items,
            rungs=plan.rungs, reward=plan.reward, cache_dir=str(plan.cache_dir),
            extraction_knobs=tuple(seg_cls.extraction_knobs), fidelity=bool(args.fidelity),
            device=device)
        ctx.settings_key = _settings_key(ctx)

        client = MlflowClient(plan.tracking_uri)
        exp_name = tracking.experiment_name(r.method, r.backbone_name, plan.dataset_name)
        try:
            exp_id = tracking.ensure_experiment(client, exp_name)
        except Exception as e:
            raise OvssError(f"cannot open MLflow store {plan.tracking_uri}: "
                            f"{str(e).splitlines()[0]}") from None
        tags = {"ovss_method": r.method, "ovss_backbone": r.backbone_name,
                "ovss_dataset": plan.dataset_name, "ovss_reward": plan.reward["name"],
                "ovss_search_name": plan.name}
        reopen = tracking.previous_search_run(client, exp_id, plan.name) if args.resume \
            else None
        with tracking.parent_run(client, exp_id, plan.name, tags, reopen) as parent_id:
            from search.holdout import dataset_input, finish_search
            from search.tune import extraction_pass, log_search_outputs, tune_search

            if reopen is None:
                _log_plan(client, parent_id, plan, ctx)
                client.log_inputs(parent_id, [dataset_input(plan)])
            callback = tracking.MlflowTrialCallback(
                plan.tracking_uri, exp_id, parent_id, plan.reward["name"] + "_score"
                if plan.reward["name"] == "clip" else "miou", {})
            callback.dataset_input = dataset_input(plan)
            try:
                n_new = extraction_pass(ctx, args.gpus_per_trial, args.cpus_per_trial)
                client.set_tag(parent_id, "ovss_extracted_images", str(n_new))
                results = tune_search(plan, ctx, callback)
            finally:
                callback.close_open_runs("KILLED")
            best = log_search_outputs(client, parent_id, plan, ctx, results, callback)
            held = finish_search(client, parent_id, plan, best)
        return (f"best {plan.reward['name']}={best['score']:.4f} with {best['params']}\n"
                + (f"{held}\n" if held else "") +
                f"MLflow experiment {exp_name!r} run {parent_id} at {plan.tracking_uri}\n"
                f"export: python -m search.export --method {r.method} --backbone "
                f"{r.backbone_name} --dataset {plan.dataset_name} --tracking-uri "
                f"{plan.tracking_uri}")
    finally:
        if started:
            ray.shutdown()


def _settings_key(ctx) -> dict:
    """The segmenter's own settings key when it can give one without loading weights, else the
    backbone spec + settings (every input of extract besides the image)."""
    return {"backbone": ctx.backbone, "settings": ctx.settings, "classes": ctx.classes}


def _log_plan(client, parent_id: str, plan, ctx) -> None:
    import yaml

    from search import tracking

    r = plan.resolved
    params = {"method": r.method, "backbone": r.backbone_name, "dataset": plan.dataset_name,
              "reward": plan.reward["name"], "num_samples": plan.num_samples,
              "images": len(plan.items), "rungs": plan.rungs, "seed": plan.args.seed,
              "gpus_per_trial": plan.args.gpus_per_trial,
              **{f"settings.{k}": v for k, v in r.settings.items()},
              **{f"default.{k}": v for k, v in r.defaults.items()}}
    tracking.log_params(client, parent_id, params)
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "search_space.yaml"
        p.write_text(yaml.safe_dump({k: v.model_dump(exclude_none=True)
                                     for k, v in r.space.items()}, sort_keys=False))
        client.log_artifact(parent_id, str(p))
