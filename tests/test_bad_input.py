"""Bad input, one table (in three files): every case exits 2 with one ``error: ...`` line that
names the offending thing, prints no traceback, is decided before Ray starts when the input allows
it, and leaves nothing behind (no MLflow store or run, no cache entry, no Tune state, no output or
temporary file).

Each case is a function ``(w: Work) -> (argv, names)`` that prepares its input under the test's
working directory and returns the CLI arguments and the strings the error line must contain.
``CASES`` holds ``(make, cli, stage)``: cli is ``run`` (``python -m search.run``) or ``infer``
(``python -m methods.infer``), run in-process; stage ``pre-ray`` replaces Ray's start by a
sentinel that fails the test if reached; ``ray`` runs on the session Ray (only the cluster knows
its resources) and ``ray-task`` too (an error raised inside a Ray task: its parent run then ends
FAILED, never RUNNING or FINISHED).

The table is split by topic: the search's flags, names and Ray-only cases here; data sets in
tests/test_bad_input_data.py; ``methods.infer`` in tests/test_bad_input_infer.py. The harness is
tests/bad_input.py.
"""

from __future__ import annotations

import pytest

from search.run import main as run_main
from tests import test_bad_input_data, test_bad_input_infer
from tests.bad_input import Cases, RayStarted, check_case

CASES = Cases()


# --- numeric flags of python -m search.run ------------------------------------------------------
CASES.flags("num-samples-0", "--num-samples", "0", names=("--num-samples 0",))
CASES.flags("num-samples-negative", "--num-samples", "-3", names=("--num-samples -3",))
CASES.flags("num-samples-not-int", "--num-samples", "many", names=("--num-samples", "'many'"))
CASES.flags("max-images-0", "--max-images", "0", names=("--max-images 0",))
CASES.flags("max-images-negative", "--max-images", "-1", names=("--max-images -1",))
CASES.flags("rungs-0", "--rungs", "0", names=("--rungs 0",))
CASES.flags("rungs-negative", "--rungs", "-2", names=("--rungs -2",))
CASES.flags("cpus-per-trial-0", "--cpus-per-trial", "0", names=("--cpus-per-trial 0",))
CASES.flags("cpus-per-trial-negative", "--cpus-per-trial", "-1", names=("--cpus-per-trial -1",))
CASES.flags("cpus-per-trial-nan", "--cpus-per-trial", "nan", names=("--cpus-per-trial nan",))
CASES.flags("cpus-per-trial-too-fine", "--cpus-per-trial", "0.00001",
            names=("--cpus-per-trial 1e-05",))
CASES.flags("gpus-per-trial-negative", "--gpus-per-trial", "-1", names=("--gpus-per-trial -1",))
CASES.flags("gpus-per-trial-inf", "--gpus-per-trial", "inf", names=("--gpus-per-trial inf",))
CASES.flags("max-concurrent-0", "--max-concurrent", "0", names=("--max-concurrent 0",))
CASES.flags("max-concurrent-negative", "--max-concurrent", "-2", names=("--max-concurrent -2",))
CASES.flags("seed-negative", "--seed", "-1", names=("--seed -1",))
CASES.flags("seed-too-large", "--seed", str(2 ** 32), names=(f"--seed {2 ** 32}",))

# --- --set: wrong type, outside the knob's space, unknown key -----------------------------------
CASES.flags("set-fixed-knob-not-a-number", "--set", "temp=abc", names=("temp", "'abc'", "number"))
CASES.flags("set-fixed-int-knob-fraction", "--set", "pool=1.5", names=("pool", "integer"))
CASES.flags("set-fixed-knob-outside-space", "--set", "pool=7", names=("pool=7", "[0, 2]"))
CASES.flags("set-fixed-knob-bool", "--set", "thr=true", names=("thr", "number"))
CASES.flags("set-fixed-categorical-unknown", "--set", "mode=cubic", names=("mode", "cubic",
                                                                           "linear, square"))
CASES.flags("set-space-low-above-high", "--set", "space.temp.low=5",
            names=("space.temp.low", "low 5.0 is above high 1.0"))
CASES.flags("set-space-low-not-a-number", "--set", "space.temp.low=abc",
            names=("space.temp.low", "valid number"))
CASES.flags("set-space-step-0", "--set", "space.pool.step=0", names=("space.pool.step", "step 0"))
CASES.flags("set-space-log-low-negative", "--set", "space.temp.low=-1",
            names=("space.temp.low", "log scale"))
CASES.flags("set-space-no-choices", "--set", "space.mode.choices=[]",
            names=("space.mode.choices", "at least 1"))
CASES.flags("set-space-unknown-field", "--set", "space.pool.bogus=1", names=("space.pool.bogus",
                                                                             "'bogus'"))
CASES.flags("set-space-unknown-knob", "--set", "space.nosuch.low=1", names=("'space.nosuch.low'",))
CASES.flags("set-unknown-knob", "--set", "tua=6", names=("'tua'",))
CASES.flags("set-without-value", "--set", "temp", names=("'temp'", "key=value"))
CASES.flags("set-unknown-setting", "--set", "settings.nosuch=1", names=("'settings.nosuch'",))
CASES.flags("set-setting-wrong-type", "--set", "settings.seed=abc", names=("settings.seed",
                                                                           "integer"))
CASES.flags("set-backbone-unknown-field", "--set", "backbone.nosuch=1", names=("backbone.nosuch",
                                                                               "path"))
CASES.flags("set-backbone-name", "--set", "backbone.name=other", names=("backbone.name",
                                                                        "--backbone"))


# --- clipseg knobs no trial could decode (methods/clipseg/reach.py, before Ray) -----------------
def clipseg_flags(name: str, *extra: str, names: tuple[str, ...]):
    """A clipseg search (tiny ViT of 4 blocks: SC-CLIP's layers 0..2) plus ``extra`` flags."""
    CASES.case(name)(lambda w: (["--method", "clipseg", "--backbone", "tiny", "--dataset",
                                 "voc21", "--data-root", str(w.voc_src), "--num-samples", "2",
                                 *extra], names))


clipseg_flags("clipseg-scclip-layer-index-out-of-range", "--preset", "scclip",
              "--set", "space.pre_adjust_idx.high=5",
              names=("pre_adjust_idx reaches 1..5", "0..2"))
clipseg_flags("clipseg-scclip-fused-ranges-overlap", "--preset", "scclip",
              "--set", "space.multi_start_idx.high=2", names=("multi_start_idx", "multi_end_idx"))
clipseg_flags("clipseg-pamr-empty-dilation-list",
              "--set", "space.pamr_dilations.choices=['8,16', '']",
              names=("pamr_dilations", "''"))
clipseg_flags("clipseg-pamr-negative-steps", "--set", "space.pamr_steps.low=-5",
              names=("pamr_steps reaches -5",))
clipseg_flags("clipseg-pamr-negative-steps-fixed", "--set", "pamr_steps=-1",
              names=("pamr_steps=-1", "[0, 20]"))


# --- clipseg's second vision model (proxyclip, trident): refused before Ray, no weights read -----
def second(name: str, *extra: str, names: tuple[str, ...], preset: str = "smoke_second"):
    CASES.case(name)(lambda w: (["--method", "clipseg", "--preset", preset, "--dataset",
                                 "voc21", "--data-root", str(w.voc_src), "--num-samples", "2",
                                 *extra], names))


second("clipseg-vision-model-unknown", "--set", "settings.vision=[tiny-dino, nosuch]",
       names=("'nosuch'", "settings.vision_models"))
second("clipseg-vision-knob-not-extracted", "--set", "settings.vision=[tiny-dino]",
       names=("vision='tiny-dinov2-reg'", "not extracted"))
second("clipseg-window-the-vision-model-cannot-take", "--set", "settings.pad_to=12",
       names=("'tiny-dino'", "patch 8", "36 px window"))
second("clipseg-trident-sam-not-a-sam", "--set", "settings.sam=tiny-dino",
       names=("settings.sam", "'tiny-dino'", "not a SAM"))
second("clipseg-trident-window-off-the-patch-grid", "--set", "settings.window=30",
       "--set", "settings.pad_to=8", names=("trident", "window 30"))
second("clipseg-sam-checkpoint-missing", names=("sam-vitb", "sam_vit_b_01ec64.pth"),
       preset="trident")
second("clipseg-vision-model-bad-arch", "--set",
       "settings.vision_models={tiny-dino: {arch: mae, tiny: {}}}",
       names=("'tiny-dino'", "arch"))


# --- unknown and malformed names -----------------------------------------------------------------
CASES.flags("unknown-backbone", "--backbone", "vit-z", names=("'vit-z'", "tiny, other"))
CASES.flags("unknown-split", "--split", "nosplit", names=("'nosplit'", "val, train"))
CASES.flags("unknown-reward-backbone", "--reward", "clip", "--reward-backbone", "nope",
            names=("--reward-backbone", "'nope'"))
CASES.flags("unknown-reward", "--reward", "dice", names=("--reward", "'dice'"))
CASES.flags("unknown-preset", "--preset", "huge", names=("--preset", "'huge'"))
CASES.flags("malformed-name", "--name", "../evil", names=("--name", "'../evil'"))
CASES.flags("unknown-tracking-scheme", "--tracking-uri", "bogus://x/y", names=("bogus://x/y",
                                                                               "'bogus'"))
CASES.flags("resume-never-ran", "--resume", "--name", "never-ran",
            names=("--resume", "'never-ran'"))

# --- cost-aware search: objectives, budget, patience, warm start (docs/cost.md) ----------------
CASES.flags("objectives-unknown", "--objectives", "miou,latency",
            names=("--objectives miou,latency", "'latency'"))
CASES.flags("objectives-no-reward", "--objectives", "seconds", names=("--objectives seconds",
                                                                      "one reward"))
CASES.flags("objectives-against-reward", "--reward", "miou", "--objectives", "clip,seconds",
            names=("--objectives clip,seconds", "--reward is miou"))
CASES.flags("budget-zero", "--max-seconds-per-image", "0",
            names=("--max-seconds-per-image 0", "positive number"))
CASES.flags("budget-negative", "--max-seconds-per-image", "-0.5",
            names=("--max-seconds-per-image -0.5", "positive number"))
CASES.flags("budget-not-a-number", "--max-seconds-per-image", "fast",
            names=("--max-seconds-per-image 'fast'", "positive number"))
CASES.flags("budget-nan", "--max-seconds-per-image", "nan",
            names=("--max-seconds-per-image nan", "positive number"))
CASES.flags("patience-0", "--patience", "0", names=("--patience 0",))
CASES.flags("patience-margin-negative", "--patience", "3", "--patience-margin", "-1",
            names=("--patience-margin -1",))
CASES.flags("warm-start-without-store", "--warm-start", "abc",
            names=("--warm-start", "no MLflow store"))


_EARLIER: dict[str, object] = {}


def _earlier_search(w, method: str) -> tuple[str, str]:
    """A store (beside the working directory's) holding one finished search run of
    ``method`` (pnp or toy): (its tracking URI, the run id). The store is made once for the
    module (a new sqlite store runs MLflow's migrations: seconds) and copied for each case."""
    import atexit
    import shutil
    import tempfile
    from pathlib import Path

    from mlflow.tracking import MlflowClient

    if not _EARLIER:
        root = Path(tempfile.mkdtemp(prefix="ovss-earlier-"))
        atexit.register(shutil.rmtree, root, True)
        client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
        for m in ("pnp", "toy"):
            exp = client.create_experiment(f"{m}/tiny/voc21",
                                           artifact_location=str(root / "mlruns"))
            run = client.create_run(exp, tags={"ovss_role": "search", "ovss_method": m})
            client.set_terminated(run.info.run_id)
            _EARLIER[m] = run.info.run_id
        _EARLIER["db"] = root / "mlflow.db"
    (w.dir / "earlier").mkdir()
    shutil.copyfile(_EARLIER["db"], w.dir / "earlier" / "mlflow.db")
    return f"sqlite:///{w.dir / 'earlier' / 'mlflow.db'}", str(_EARLIER[method])


@CASES.case("warm-start-of-another-method")
def _(w):
    uri, run = _earlier_search(w, "pnp")
    return w.toy("--warm-start", run, "--tracking-uri", uri), (f"--warm-start {run}",
                                                               "method pnp, not toy")


@CASES.case("warm-start-unknown-run")
def _(w):
    uri, _ = _earlier_search(w, "toy")
    return w.toy("--warm-start", "deadbeef", "--tracking-uri", uri), ("--warm-start deadbeef",
                                                                      "no MLflow run")


@CASES.case("warm-start-search-without-trials")
def _(w):
    uri, run = _earlier_search(w, "toy")
    return w.toy("--warm-start", run, "--tracking-uri", uri), (f"--warm-start {run}",
                                                               "no trial scored")


@CASES.case("unknown-method")
def _(w):
    return ["--method", "nosuch", "--dataset", "voc21", "--data-root", str(w.voc_src)], (
        "--method", "'nosuch'")


@CASES.case("unknown-dataset")
def _(w):
    return ["--method", "toy", "--dataset", "pascal99", "--data-root", str(w.voc_src)], (
        "'pascal99'",)


@CASES.case("malformed-dataset-name")
def _(w):
    return ["--method", "toy", "--dataset", "../voc21", "--data-root", str(w.voc_src)], (
        "'../voc21'",)


@CASES.case("missing-data-root")
def _(w):
    return w.toy(root=w.dir / "nowhere"), ("nowhere", "does not exist")


@CASES.case("cache-dir-is-a-file")
def _(w):
    (w.dir / "cachefile").write_text("x")
    return w.toy("--cache-dir", str(w.dir / "cachefile")), ("--cache-dir", "cachefile")


# --- only Ray can tell: the cluster's resources, errors raised inside Ray tasks ------------------
@CASES.case("gpus-per-trial-cluster-without-gpus", stage="ray")
def _(w):
    return w.toy("--gpus-per-trial", "64"), ("--gpus-per-trial 64", "GPU")


@CASES.case("error-inside-extraction-task", stage="ray-task")
def _(w):
    # The image is damaged after planning (another node's copy, a file being rewritten): the
    # extraction task's OvssError reaches the user as its one line, not the remote traceback.
    import search.engine.plan

    victim = w.image(0)
    plan_search = search.engine.plan.plan_search

    def plan_then_damage(args):
        plan = plan_search(args)
        victim.write_bytes(b"damaged")
        return plan

    w.monkeypatch.setattr(search.engine.plan, "plan_search", plan_then_damage)
    return w.toy("--cache-dir", str(w.dir / "cache"), root=w.voc()), (victim.name,
                                                                      "cannot read image")


def test_table_is_large_enough():
    cases = [*CASES.params, *test_bad_input_data.CASES.params, *test_bad_input_infer.CASES.params]
    assert len(cases) >= 30
    assert len({p.id for p in cases}) == len(cases)


@pytest.mark.parametrize("make, cli, stage", CASES.params)
def test_bad_input(make, cli, stage, workdir, voc_root, capsys, monkeypatch, request):
    check_case(make, cli, stage, workdir, voc_root, capsys, monkeypatch, request)


def test_max_images_is_checked_where_the_preset_would_fill_it(workdir, monkeypatch, capsys):
    """``--max-images 0`` does not fall back to the preset's value (0 is not "unset")."""
    import search.engine.session

    monkeypatch.setattr(search.engine.session, "init_ray",
                        lambda a: (_ for _ in ()).throw(RayStarted()))
    assert run_main(["--method", "toy", "--preset", "smoke", "--max-images", "0"]) == 2
    assert "--max-images 0" in capsys.readouterr().err
