"""One search, phase by phase: :func:`run_search` runs a validated :class:`search.engine.plan.Plan`.

1. check the tracking store and the Ray address; with ``--resume``, find the parent run;
2. start or join Ray (:mod:`search.engine.session`); check resources and, on a cluster, that
   every node sees the cache and the data;
3. open the parent MLflow run (:mod:`search.record.tracking`), log the plan;
4. the extraction pass (:mod:`search.engine.extract`);
5. tuning (:mod:`search.engine.tuning`), each trial a child run (:mod:`search.record.trials`);
6. with ``--rerank-top``, re-rank the best proxy trials (:mod:`search.engine.rerank`);
7. the outputs: best config, plots, overlays (:mod:`search.engine.outputs`), Ray stopped as
   soon as nothing needs it;
8. the held-out images, the description and the MLflow model
   (:func:`search.engine.outputs.finish_search`, :mod:`search.engine.holdout`).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from methods.base import OvssError
from search.core.console import python_command
from search.engine import session


def run_search(plan) -> str:
    """Run the search of ``plan`` (already validated: :func:`search.engine.plan.plan_search`)
    phase by phase (module docstring); returns the summary the CLI prints. Every run it opens
    ends FINISHED, FAILED or KILLED; the Ray it started is stopped."""
    from mlflow.tracking import MlflowClient

    from search.core.preflight import check_ray_address, check_tracking_store
    from search.record import tracking

    # 1. before Ray: the store answers, the address is reachable, the run to resume exists
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

    # 2. Ray
    phases: dict[str, float] = {}    # seconds per phase, logged as time/<phase>_s
    t0 = time.perf_counter()
    if plan.holdout_note:   # every input accepted: say which images are held out
        print(plan.holdout_note, file=sys.stderr)
    cost = getattr(plan, "cost", None)
    if cost is not None and cost.warm is not None:    # what the warm start enqueues
        print(cost.warm.note, file=sys.stderr)
    started = session.init_ray(args.address)
    phases["ray_start"] = time.perf_counter() - t0
    stopping: list = []     # the thread stopping the Ray this call started, once it is unused

    def stop_ray() -> None:
        """Stop our Ray in the background (its processes take ~1 s to exit) while the driver
        logs the model and the description."""
        import threading

        if started and not stopping:
            stopping.append(threading.Thread(target=session.shutdown_ray,
                                             name="ovss-ray-shutdown"))
            stopping[0].start()

    try:
        resources = session.plan_resources(args)
        if args.address:   # a cluster: every node must see the cache and the data
            from search.core.preflight import check_nodes_see_inputs

            first = plan.items[0] if plan.items else None
            paths = [plan.data_kwargs["root"]]
            if first is not None:
                from search.data import open_dataset

                paths.append(str(open_dataset(**plan.data_kwargs).image_path(first.index)))
            check_nodes_see_inputs(plan.cache_dir, paths)
        ctx = search_context(plan, "cuda" if args.gpus_per_trial > 0 else "cpu")
        search_ctx = ctx          # two-stage search (--rerank-top): trials run the proxy
        if getattr(plan, "rerank_top", 0):
            from search.engine.rerank import proxy_context

            search_ctx = proxy_context(ctx, plan.proxy)

        # 3. the parent run
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
            from search.engine.extract import extraction_pass
            from search.engine.outputs import finish_search, log_search_outputs
            from search.engine.tuning import tune_search
            from search.record.trials import MlflowTrialCallback

            if reopen is None:
                _log_plan(client, parent_id, plan, ctx)
                client.log_inputs(parent_id, [tracking.dataset_input(plan)])
            callback = MlflowTrialCallback(
                plan.tracking_uri, exp_id, parent_id, plan.reward["name"] + "_score"
                if plan.reward["name"] == "clip" else "miou", {},
                tags={"ovss_presence_source": ctx.presence_source})
            callback.dataset_input = tracking.dataset_input(plan)
            try:
                # 4. extraction
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
                cost = getattr(plan, "cost", None)
                if cost is not None and cost.measure:   # 4b. the cost probe
                    _probe_cost(client, parent_id, plan, search_ctx, resources)
                session.fault_point("before_tuning")
                # 5. tuning
                t0, cpu0 = time.perf_counter(), time.process_time()
                results = tune_search(plan, search_ctx, callback)
                phases["tune"] = time.perf_counter() - t0
                # The driver's own CPU while tuning (Tune's loop, the MLflow writer): on a small
                # machine it is taken from the trials.
                phases["tune_driver_cpu"] = time.process_time() - cpu0
            finally:
                callback.close_open_runs("KILLED")
            session.fault_point("after_tuning")
            t0 = time.perf_counter()
            chosen = None
            if callback.offline:    # the store failed: the outputs go to disk for search.sync
                from search.engine.outputs import write_offline_outputs

                path = write_offline_outputs(plan, results, parent_id, callback)
                raise OvssError(
                    f"the MLflow store {plan.tracking_uri} failed during the search "
                    f"({callback.offline}); the search finished: its trials and best config are "
                    f"in {path.parent}; push them with: "
                    + python_command("-m", "search.sync", "--name", plan.name, "--storage",
                                     str(plan.storage), "--tracking-uri", plan.tracking_uri))
            from search.engine.pareto import after_tuning, summary

            after_tuning(client, parent_id, plan, results, callback)   # front, budget, stop
            if getattr(plan, "rerank_top", 0):     # 6. re-ranking
                from search.engine.rerank import rerank

                chosen = rerank(client, parent_id, plan, ctx, results)
            # 7. best config, plots, overlays
            best = log_search_outputs(client, parent_id, plan, ctx, results, callback, chosen,
                                      ray_done=stop_ray)
            phases["outputs"] = time.perf_counter() - t0
            tracking.log_metrics(client, parent_id, {f"time/{k}_s": v for k, v in phases.items()},
                                 0)
            if callback.orphaned:
                client.set_tag(parent_id, "ovss_orphaned_runs", str(len(callback.orphaned)))
            # 8. held-out images, description, model
            held = finish_search(client, parent_id, plan, best, ray_done=stop_ray)
        stopped = client.get_run(parent_id).data.tags.get("ovss_stop_reason", "")
        best_lines = summary(plan, best, results_rows(plan, results), callback)
        if stopped.startswith("patience"):
            best_lines.append(f"stopped: {stopped}")
        return "\n".join(summary_lines(plan, best_lines, chosen, held, exp_name, exp_id,
                                       parent_id))
    finally:
        if stopping:
            stopping[0].join()
        elif started:
            session.shutdown_ray()


def summary_lines(plan, best_lines: list[str], chosen, held: list[str], exp_name: str,
                  exp_id: str, parent_id: str) -> list[str]:
    """What the CLI prints at the end of a search (stdout): the best config with its score in
    percent (:mod:`search.core.console`; ``best_lines``, with a cost-aware search's front and
    fastest config, :func:`search.engine.pareto.summary`), the held-out comparison and the
    model, where the record is, then each next step as a command alone on its line that runs as
    printed."""
    from search.engine.outputs import export_command
    from search.record.tracking import ui_link

    url, serve = ui_link(plan.tracking_uri, exp_id)
    lines = [chosen["summary"]] if chosen else []
    lines += [*best_lines, *held,
              f"MLflow experiment {exp_name!r} run {parent_id} at {plan.tracking_uri}",
              f"runs table: {url}" + (", served by:" if serve else "")]
    if serve:
        lines.append(f"  {serve}")
    lines += ["export the best config:", "  " + export_command(plan)]
    return lines


def results_rows(plan, results) -> list:
    from search.engine.tuning import best_result

    return best_result(results, list(plan.resolved.space))[1]


def _probe_cost(client, parent_id: str, plan, ctx, resources) -> None:
    """Phase 4b: the seconds per image of ``extract`` on the extraction device, set on the
    context every trial receives, logged on the parent run."""
    from search.engine.probe import measure_extraction
    from search.record import tracking

    got = measure_extraction(ctx, resources["extract_gpus"], resources["extract_cpus"])
    ctx.cost_extract = {"seconds": got["seconds"], "device_kind": got["device_kind"]}
    plan.cost.device_kind = got["device_kind"]
    tracking.log_metrics(client, parent_id, {"cost/extract_s": got["seconds"]}, 0)
    client.set_tag(parent_id, "ovss_cost_device", got["device_kind"])
    print(f"cost: extract {got['seconds']:.4g} s per image on {got['device_kind']} "
          f"({'cached' if got['cached'] else 'measured'})", file=sys.stderr)


def resume_target(exp_name: str, plan) -> str | None:
    """With ``--resume``: the parent run of the search to continue, or a one-line refusal when
    there is none, or it finished with no failed trial to re-run. Runs before Ray starts and
    writes nothing."""
    from search.record import tracking

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


def search_context(plan, device: str):
    """The picklable :class:`search.core.trial.SearchContext` of a validated plan."""
    from methods import get_segmenter_class
    from search.core.trial import SearchContext, settings_key

    r = plan.resolved
    ctx = SearchContext(
        method=r.method, backbone=r.backbone, settings=r.settings, defaults=r.defaults,
        classes=plan.classes.to_dict(), dataset=plan.data_kwargs, items=plan.items,
        rungs=plan.rungs, reward=plan.reward, cache_dir=str(plan.cache_dir),
        extraction_knobs=tuple(get_segmenter_class(r.method).extraction_knobs),
        fidelity=bool(plan.args.fidelity), device=device,
        presence_source=r.settings.get("presence_source", "model"))
    ctx.settings_key = settings_key(ctx)
    return ctx


def _cost_params(plan) -> dict:
    cost = getattr(plan, "cost", None)
    if cost is None:
        return {}
    out = {"objectives": ",".join(cost.objectives), "max_seconds_per_image": cost.budget,
           "patience": cost.patience, "patience_margin": cost.margin if cost.patience else None,
           "warm_start": cost.warm.source if cost.warm is not None else None}
    return {k: v for k, v in out.items() if v is not None}


def _log_plan(client, parent_id: str, plan, ctx) -> None:
    import yaml

    from search.record import tracking

    r = plan.resolved
    params = {"method": r.method, "backbone": r.backbone_name, "dataset": plan.dataset_name,
              "reward": plan.reward["name"], "num_samples": plan.num_samples,
              "images": len(plan.items), "rungs": plan.rungs, "seed": plan.args.seed,
              "sampler": getattr(plan.args, "sampler", "tpe"),
              "gpus_per_trial": plan.args.gpus_per_trial,
              "gpus_per_extract": plan.args.gpus_per_extract,
              **_cost_params(plan),
              **{f"settings.{k}": v for k, v in r.settings.items()},
              **{f"default.{k}": v for k, v in r.defaults.items()}}
    tracking.log_params(client, parent_id, params)
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "search_space.yaml"
        p.write_text(yaml.safe_dump({k: v.model_dump(exclude_none=True)
                                     for k, v in r.space.items()}, sort_keys=False))
        client.log_artifact(parent_id, str(p))
