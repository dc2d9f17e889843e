"""Runs a validated :class:`search.run.Plan`: Ray, the extraction pass, Ray Tune and MLflow."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

from methods.base import OvssError

# A local Ray starts faster with these (bench/ray_start.py measures them against Ray's defaults):
# - its raylet's first connection to its own object store fails (the store is not listening yet)
#   and Ray waits raylet_client_connect_timeout_milliseconds (1000) before the next try, which
#   often makes ray.init wait one more second for the node to register; same 10 s budget here
#   (100 x 100 ms instead of 10 x 1000 ms);
# - the raylet starts its idle workers (one per CPU, as Ray does) when it starts, not when the
#   first driver registers, so they boot while ray.init waits (~0.3 s).
LOCAL_RAY_ENV = {"RAY_raylet_client_connect_timeout_milliseconds": "100",
                 "RAY_raylet_client_num_connect_attempts": "100",
                 "RAY_enable_worker_prestart": "1",
                 "RAY_prestart_worker_first_driver": "0"}


@contextlib.contextmanager
def scoped_env(values: dict[str, str]):
    """Set ``values`` in ``os.environ`` inside the block, each unless the user set it already."""
    mine = {k: v for k, v in values.items() if k not in os.environ}
    os.environ.update(mine)
    try:
        yield
    finally:
        for k in mine:
            os.environ.pop(k, None)


def init_ray(address: str | None) -> bool:
    """Start or join Ray. Returns True when this call started it (and so should stop it, with
    :func:`shutdown_ray`). A local Ray advertises ``OVSS_LOCAL_GPUS`` GPUs when it is set
    (search.devices.local_gpus), else what Ray detects."""
    import ray

    from search.devices import local_gpus

    if ray.is_initialized():
        return False
    gpus = local_gpus(address)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                          "configure_logging": False}
    try:
        if address:
            ray.init(address=address, **kw)
        else:
            if gpus is not None:
                kw["num_gpus"] = gpus
            with scoped_env(LOCAL_RAY_ENV):   # read by the processes ray.init starts
                ray.init(**kw)
    except Exception as e:  # ConnectionError, RuntimeError, ...
        where = f"at --address {address}" if address else "locally"
        hint = ""
        if address and not os.environ.get("RAY_AUTH_MODE"):
            # Ray 2.60 turns token authentication on by itself when ~/.ray/auth_token exists.
            hint = (" (if the cluster and this machine disagree on token authentication, set "
                    "RAY_AUTH_MODE=token with the cluster's RAY_AUTH_TOKEN, or "
                    "RAY_AUTH_MODE=disabled, on both)")
        raise OvssError(f"cannot start Ray {where}: {str(e).splitlines()[0]}{hint}") from None
    return True


def shutdown_ray() -> None:
    """``ray.shutdown()`` of a Ray that :func:`init_ray` started, less the second it spends on
    the autoscaler monitor: that process does not exit on SIGTERM, and Ray waits 1 s before it
    SIGKILLs it. A local Ray's monitor keeps no state, so it is killed first. (Ray's private
    process table; when it is not there, the plain shutdown.)"""
    import ray

    try:
        node = ray._private.worker._global_node
        for info in list(getattr(node, "all_processes", {}).get("monitor", [])):
            if info.process.poll() is None:
                info.process.kill()
                info.process.wait(timeout=2)
    except Exception:  # noqa: BLE001 - an internal layout this Ray does not have
        pass
    ray.shutdown()


def plan_resources(args) -> dict[str, float]:
    """Resource requests for extraction (the model) and for trials (decode only), checked
    against the cluster. A GPU cluster extracts on GPU by default and says so when trials ask
    for none; with ``--autoscale`` missing resources are requested from the autoscaler instead
    of refused (Tune and the extraction tasks then wait for the new nodes)."""
    import sys

    import ray

    res = ray.cluster_resources()
    gpus = float(res.get("GPU", 0))
    extract_gpus = (args.gpus_per_extract if args.gpus_per_extract is not None
                    else (1.0 if gpus >= 1 else 0.0))
    want = {"extract": {"GPU": extract_gpus, "CPU": args.cpus_per_extract},
            "trial": {"GPU": args.gpus_per_trial, "CPU": args.cpus_per_trial}}
    flags = {"extract": ("--gpus-per-extract", "--cpus-per-extract"),
             "trial": ("--gpus-per-trial", "--cpus-per-trial")}
    missing = []
    for role, need in want.items():
        for i, kind in enumerate(("GPU", "CPU")):
            if need[kind] > 0 and float(res.get(kind, 0)) < need[kind]:
                missing.append((role, kind, flags[role][i], need[kind]))
    if missing and getattr(args, "autoscale", False):
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[{k: v for k, v in need.items() if v > 0}
                                   for need in want.values()])
        print(f"asked the autoscaler for {', '.join(f'{n:g} {k}' for _, k, _, n in missing)}",
              file=sys.stderr)
    elif missing:
        role, kind, flag, n = missing[0]
        raise OvssError(f"{flag} {n:g} asked for, but the Ray cluster has "
                        f"{float(res.get(kind, 0)):g} {kind}(s) (on a cluster that scales up "
                        "on demand, add --autoscale)")
    if gpus > 0 and args.gpus_per_trial == 0:
        print(f"note: the Ray cluster has {gpus:g} GPU(s); trials decode on CPU "
              "(--gpus-per-trial 0), extraction uses "
              f"{extract_gpus:g} GPU per task (--gpus-per-extract)", file=sys.stderr)
    return {"extract_gpus": extract_gpus, "extract_cpus": args.cpus_per_extract,
            "trial_gpus": args.gpus_per_trial, "trial_cpus": args.cpus_per_trial}


def fault_point(name: str) -> None:
    """Fault-injection point for the crash tests: with ``OVSS_FAULT_PAUSE=<name>`` the driver
    says so on stderr and waits here to be killed. Does nothing otherwise."""
    if os.environ.get("OVSS_FAULT_PAUSE") == name:
        import sys
        import time

        print(f"ovss fault point: {name}", file=sys.stderr, flush=True)
        while True:
            time.sleep(1)


def resume_target(exp_name: str, plan) -> str | None:
    """With ``--resume``: the parent run of the search to continue, or a one-line refusal when
    there is none, or it finished with no failed trial to re-run. Runs before Ray starts and
    writes nothing."""
    from search import tracking

    if not plan.args.resume:
        return None
    where = f"in the MLflow store {plan.tracking_uri}"
    db = plan.tracking_uri.removeprefix("sqlite:///")
    if plan.tracking_uri.startswith("sqlite:///") and not Path(db).is_file():
        exp = None   # no store yet: nothing to resume (and opening it would create the file)
    else:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(plan.tracking_uri)
        exp = client.get_experiment_by_name(exp_name)
    run = tracking.previous_search(client, exp.experiment_id, plan.name) if exp else None
    if run is None:
        raise OvssError(f"--resume: no search named {plan.name!r} {where}: run it without "
                        "--resume")
    failed = client.search_runs(
        [exp.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}' and "
        "attributes.status = 'FAILED'", max_results=1)
    if run.info.status == "FINISHED" and not failed:   # failed trials: resume re-runs them
        n = run.data.metrics.get("trials")
        done = f" with {int(n)} scored trials" if n is not None else ""
        raise OvssError(f"--resume: search {plan.name!r} already finished{done} (run "
                        f"{run.info.run_id}); nothing to resume: start a new search with "
                        "another --name to run more trials")
    return run.info.run_id


def run_search(plan) -> str:
    from mlflow.tracking import MlflowClient

    from search import tracking
    from search.preflight import check_ray_address, check_tracking_store

    args = plan.args
    r = plan.resolved
    check_tracking_store(plan.tracking_uri)
    check_ray_address(args.address)
    exp_name = tracking.experiment_name(r.method, r.backbone_name, plan.dataset_name)
    try:
        reopen = resume_target(exp_name, plan)
    except OvssError:
        raise
    except Exception as e:
        raise OvssError(f"cannot open MLflow store {plan.tracking_uri}: "
                        f"{str(e).splitlines()[0]}") from None
    import sys
    import time

    phases: dict[str, float] = {}    # seconds per phase, logged as time/<phase>_s
    t0 = time.perf_counter()
    if plan.holdout_note:   # every input accepted: say which images are held out
        print(plan.holdout_note, file=sys.stderr)
    started = init_ray(args.address)
    phases["ray_start"] = time.perf_counter() - t0
    stopping: list = []     # the thread stopping the Ray this call started, once it is unused

    def stop_ray() -> None:
        """Stop our Ray in the background (its processes take ~1 s to exit) while the driver
        logs the model and the description."""
        import threading

        if started and not stopping:
            stopping.append(threading.Thread(target=shutdown_ray, name="ovss-ray-shutdown"))
            stopping[0].start()

    try:
        resources = plan_resources(args)
        if args.address:   # a cluster: every node must see the cache and the data
            from search.preflight import check_nodes_see_inputs

            first = plan.items[0] if plan.items else None
            paths = [plan.data_kwargs["root"]]
            if first is not None:
                from search.data import open_dataset

                paths.append(str(open_dataset(**plan.data_kwargs).image_path(first.index)))
            check_nodes_see_inputs(plan.cache_dir, paths)
        ctx = search_context(plan, "cuda" if args.gpus_per_trial > 0 else "cpu")
        search_ctx = ctx          # two-stage search (--rerank-top): trials run the proxy
        if getattr(plan, "rerank_top", 0):
            from search.rerank import proxy_context

            search_ctx = proxy_context(ctx, plan.proxy)

        client = MlflowClient(plan.tracking_uri)   # (creates a sqlite store's file)
        try:
            exp_id = tracking.ensure_experiment(client, exp_name)
        except Exception as e:
            raise OvssError(f"cannot open MLflow store {plan.tracking_uri}: "
                            f"{str(e).splitlines()[0]}") from None
        tags = {"ovss_method": r.method, "ovss_backbone": r.backbone_name,
                "ovss_dataset": plan.dataset_name, "ovss_reward": plan.reward["name"],
                "ovss_search_name": plan.name, "ovss_presence_source": ctx.presence_source}
        with tracking.parent_run(client, exp_id, plan.name, tags, reopen) as parent_id:
            from search.holdout import dataset_input, finish_search
            from search.tune import extraction_pass, log_search_outputs, tune_search

            if reopen is None:
                _log_plan(client, parent_id, plan, ctx)
                client.log_inputs(parent_id, [dataset_input(plan)])
            callback = tracking.MlflowTrialCallback(
                plan.tracking_uri, exp_id, parent_id, plan.reward["name"] + "_score"
                if plan.reward["name"] == "clip" else "miou", {},
                tags={"ovss_presence_source": ctx.presence_source})
            callback.dataset_input = dataset_input(plan)
            try:
                t0 = time.perf_counter()
                n_new = extraction_pass(search_ctx, resources["extract_gpus"],
                                        resources["extract_cpus"])
                phases["extract"] = time.perf_counter() - t0
                client.set_tag(parent_id, "ovss_extracted_images", str(n_new))
                if search_ctx.extract_nodes:
                    client.set_tag(parent_id, "ovss_extract_nodes",
                                   ",".join(search_ctx.extract_nodes))
                if search_ctx.device_notes:   # Ray's GPUs that torch could not use
                    client.set_tag(parent_id, "ovss_device_fallback",
                                   " | ".join(search_ctx.device_notes.values()))
                fault_point("before_tuning")
                t0, cpu0 = time.perf_counter(), time.process_time()
                results = tune_search(plan, search_ctx, callback)
                phases["tune"] = time.perf_counter() - t0
                # The driver's own CPU while tuning (Tune's loop, the MLflow writer): on a small
                # machine it is taken from the trials.
                phases["tune_driver_cpu"] = time.process_time() - cpu0
            finally:
                callback.close_open_runs("KILLED")
            fault_point("after_tuning")
            t0 = time.perf_counter()
            chosen = None
            if callback.offline:
                from search.tune import write_offline_outputs

                path = write_offline_outputs(plan, results, parent_id, callback)
                raise OvssError(
                    f"the MLflow store {plan.tracking_uri} failed during the search "
                    f"({callback.offline}); the search finished: its trials and best config are "
                    f"in {path.parent}; push them with: python -m search.sync --name "
                    f"{plan.name} --storage {plan.storage} --tracking-uri {plan.tracking_uri}")
            if getattr(plan, "rerank_top", 0):
                from search.rerank import rerank

                chosen = rerank(client, parent_id, plan, ctx, results)
            best = log_search_outputs(client, parent_id, plan, ctx, results, callback, chosen,
                                      ray_done=stop_ray)
            phases["outputs"] = time.perf_counter() - t0
            tracking.log_metrics(client, parent_id, {f"time/{k}_s": v for k, v in phases.items()},
                                 0)
            if callback.orphaned:
                client.set_tag(parent_id, "ovss_orphaned_runs", str(len(callback.orphaned)))
            held = finish_search(client, parent_id, plan, best, ray_done=stop_ray)
        return ((chosen["summary"] + "\n" if chosen else "") +
                f"best {plan.reward['name']}={best['score']:.4f} with {best['params']}\n"
                + (f"{held}\n" if held else "") +
                f"MLflow experiment {exp_name!r} run {parent_id} at {plan.tracking_uri}\n"
                f"export: python -m search.export --method {r.method} --backbone "
                f"{r.backbone_name} --dataset {plan.dataset_name} --tracking-uri "
                f"{plan.tracking_uri}")
    finally:
        if stopping:
            stopping[0].join()
        elif started:
            shutdown_ray()


def search_context(plan, device: str):
    """The picklable :class:`search.trial.SearchContext` of a validated plan."""
    from methods import get_segmenter_class
    from search.trial import SearchContext

    r = plan.resolved
    ctx = SearchContext(
        method=r.method, backbone=r.backbone, settings=r.settings, defaults=r.defaults,
        classes=plan.classes.to_dict(), dataset=plan.data_kwargs, items=plan.items,
        rungs=plan.rungs, reward=plan.reward, cache_dir=str(plan.cache_dir),
        extraction_knobs=tuple(get_segmenter_class(r.method).extraction_knobs),
        fidelity=bool(plan.args.fidelity), device=device,
        presence_source=r.settings.get("presence_source", "model"))
    ctx.settings_key = _settings_key(ctx)
    return ctx


def _settings_key(ctx) -> dict:
    """The segmenter's own settings key when it can give one without loading weights, else the
    backbone spec + settings (every input of extract besides the image), with the identity of
    the weights they name (hub commit, or a local checkpoint's size, mtime and sha256)."""
    from search.cache import weights_identity

    return {"backbone": ctx.backbone, "settings": ctx.settings, "classes": ctx.classes,
            "weights": weights_identity(ctx.backbone),
            "settings_weights": weights_identity(ctx.settings)}


def _log_plan(client, parent_id: str, plan, ctx) -> None:
    import yaml

    from search import tracking

    r = plan.resolved
    params = {"method": r.method, "backbone": r.backbone_name, "dataset": plan.dataset_name,
              "reward": plan.reward["name"], "num_samples": plan.num_samples,
              "images": len(plan.items), "rungs": plan.rungs, "seed": plan.args.seed,
              "sampler": getattr(plan.args, "sampler", "tpe"),
              "gpus_per_trial": plan.args.gpus_per_trial,
              "gpus_per_extract": plan.args.gpus_per_extract,
              **{f"settings.{k}": v for k, v in r.settings.items()},
              **{f"default.{k}": v for k, v in r.defaults.items()}}
    tracking.log_params(client, parent_id, params)
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "search_space.yaml"
        p.write_text(yaml.safe_dump({k: v.model_dump(exclude_none=True)
                                     for k, v in r.space.items()}, sort_keys=False))
        client.log_artifact(parent_id, str(p))
