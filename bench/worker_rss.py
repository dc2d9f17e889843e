"""Peak RSS of a clipseg trial worker on cached evidence: from the decode head vs the full model.

    python bench/worker_rss.py               # 4 images, ViT-B/16 (random weights), ~1-2 min
    python bench/worker_rss.py --images 8

The real-size open_clip ViT-B/16 with random weights (saved as a local checkpoint, loaded with
``backbone.path``, as ``bench/search.py``), a generated VOC-layout data set of ``--images``
images (375 x 500). A first process runs the extraction pass
(``search.core.trial.extract_item``: the evidence and the decode head go to the cache); then each
mode runs in a fresh Python process, as a Tune trial worker does: ``search.core.trial.evaluate``
with the paper's defaults on every image.
Its peak RSS is read from ``/proc/self/status`` (VmHWM); ``worker/max_rss_mb`` (ru_maxrss) is
printed too (the processes are started by this small one, so it is not inflated by a parent).

- ``head``: what a trial worker does now (the segmenter from the cached decode head, no model);
- ``full``: what it did before (``from_spec``: the whole CLIP is built, then decode).

Printed: both peaks, the evidence the worker read (on disk), both scores (they must be equal:
decode from the head is bit-identical) and the last line ``rss_ratio=<head over full>``.
No Ray, no MLflow: the difference is the segmenter alone.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def hwm_mb() -> float:
    """This process's own peak RSS (VmHWM, reset at exec), MiB. ``ru_maxrss`` is not: Linux
    keeps it across fork + exec, so a child of a big process reports the parent's size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def context(root: Path, images: int):
    """The search context of the bench's search (planned again in each process: the plan is
    deterministic, and nothing is unpickled)."""
    from search.engine.plan import plan_search
    from search.engine.search import search_context
    from search.run import build_parser

    os.chdir(root)
    plan = plan_search(build_parser().parse_args(
        ["--method", "clipseg", "--backbone", "openai-vit-b16", "--dataset", "voc21",
         "--data-root", str(root / "voc"), "--max-images", str(images), "--rungs", "1",
         "--cache-dir", str(root / "cache"), "--set",
         f"backbone.path={root / 'vit-b16-random.pt'}", "--set", "settings.templates=simple"]))
    return search_context(plan, "cpu")


def extract(root: Path, images: int) -> dict:
    """The extraction pass (evidence and decode head into the cache)."""
    import open_clip
    import torch

    import search.core.trial as trial
    from methods.io import atomic_write
    from search.data.synthetic import make_dataset

    torch.set_num_threads(1)
    make_dataset("voc", root / "voc", n=images, size=(375, 500), seed=0)
    ckpt = root / "vit-b16-random.pt"
    if not ckpt.is_file():
        torch.manual_seed(0)
        model = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None)
        atomic_write(ckpt, lambda f: torch.save(model.state_dict(), f))
        del model
    ctx = context(root, images)
    t0 = time.perf_counter()
    for item in ctx.items:
        trial.extract_item(ctx, item)
    trial.get_segmenter(ctx)                         # (writes the head if all was cached)
    cache = trial.get_cache(ctx)
    return {"extract_s": time.perf_counter() - t0,
            "evidence_mb": sum(cache.path(ctx.method, ctx.base_key(i)).stat().st_size
                               for i in ctx.items) / 2**20,
            "head_mb": cache.path(ctx.method, trial.decode_state_key(ctx)).stat().st_size / 2**20}


def worker(mode: str, root: Path, images: int) -> dict:
    """One fresh trial worker: evaluate the defaults on cached evidence."""
    import search.core.trial as trial
    from methods.clipseg.segmenter import ClipSegSegmenter

    if mode == "full":                      # the worker before the decode head
        ClipSegSegmenter.from_decode_state = None
    ctx = context(root, images)
    t0 = time.perf_counter()
    result = trial.evaluate(ctx, {}, lambda r: None)
    return {"hwm_mb": hwm_mb(), "ru_maxrss_mb": result["worker/max_rss_mb"],
            "score": result["score"], "model_built": trial.get_segmenter(ctx).model_built,
            "wall_s": time.perf_counter() - t0}


def child(mode: str, root: Path, images: int) -> dict:
    """Run ``mode`` in a fresh Python process started by this small one."""
    run = subprocess.run([sys.executable, __file__, "--mode", mode, "--root", str(root),
                          "--images", str(images)], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False)
    if run.returncode != 0:
        sys.stderr.write(run.stderr[-3000:])
        raise SystemExit(f"{mode} failed with exit {run.returncode}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--keep", help="work directory to keep (default: a temp dir, removed)")
    ap.add_argument("--mode", choices=("extract", "head", "full"), help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.mode:
        root = Path(args.root)
        out = extract(root, args.images) if args.mode == "extract" else worker(args.mode, root,
                                                                          args.images)
        print(json.dumps(out))
        return 0
    with tempfile.TemporaryDirectory(prefix="ovss-bench-rss-") as tmp:
        root = Path(args.keep or tmp).resolve()
        root.mkdir(parents=True, exist_ok=True)
        info = child("extract", root, args.images)
        print(f"worker RSS bench: clipseg ViT-B/16 (random weights), {args.images} images "
              f"375x500, evidence cached first ({info['extract_s']:.0f} s, not counted); "
              f"evidence {info['evidence_mb']:.1f} MiB on disk, decode head "
              f"{info['head_mb']:.1f} MiB")
        out = {}
        for mode in ("full", "head"):
            r = out[mode] = child(mode, root, args.images)
            print(f"{mode}: peak RSS {r['hwm_mb']:.0f} MiB (VmHWM; ru_maxrss "
                  f"{r['ru_maxrss_mb']:.0f}), model built {r['model_built']}, "
                  f"miou {r['score']:.6f}, {r['wall_s']:.1f} s")
        same = out["head"]["score"] == out["full"]["score"]
        print(f"scores equal: {same}; peak RSS saved "
              f"{out['full']['hwm_mb'] - out['head']['hwm_mb']:.0f} MiB")
        print(f"rss_ratio={out['head']['hwm_mb'] / out['full']['hwm_mb']:.3f}")
        return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
