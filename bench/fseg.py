"""Extract once, decode many vs the naive search, for `fseg` on a LLaVA-shaped model + SAM ViT-B.

    python bench/fseg.py                        # 4 images, 4 classes, 64 trials, 14 blocks (20 GB)
    python bench/fseg.py --layers 4 --images 1  # what a shared machine allows (10.6 GB)
    python bench/fseg.py --images 1 --trials 4 --layers 2 --width 512 --vision-layers 4 --quick
    python bench/fseg.py --precision 40         # float16 vs float32 evidence on the tiny models
    python bench/fseg.py --device cuda --layers 32   # LLaVA-1.5-7B's depth, float16, on the GPU

Models (random weights, no download), built by the method's own loader from a ``tiny:`` block:
- LLaVA-1.5 shape: CLIP ViT-L/14-336 vision tower (24 blocks, width 1024, 576 image tokens),
  the real LLaVA projector, and a Llama LLM of ``--layers`` blocks of width ``--width``
  (defaults: 14 of Llama-2-7B's 32 blocks at its width 4096 / MLP 11008 / 32 heads, vocabulary
  32064: 3.0 B parameters, 12 GB in float32); the printed line gives the parameter counts;
- SAM ViT-B: segment-anything's real architecture (1024 px encoder), random weights.
Images are 375 x 500; classes: cat, dog, person, bird + background. Presence comes from the
model on both sides (``presence_source: model``: extract gets no labels, ``qa: auto`` runs the
greedy QAP): random weights never say yes, so ``ScriptedQAP`` replaces the logits of every
forward so that greedy decoding spells "yes, it contains a {c}. the {c} is the main object in
this image." for cat, dog, person and "no." for bird; every decoding step still runs its real
forward (KV cache, image). Trial 0 is the paper's defaults (layers scaled to the bench LLM),
the others are sampled from conf/methods/fseg.yaml's space.

- ours:  extract each image once (vision tower, one prefix pass, greedy QAP per class from the
  prefix KV cache, one batched teacher-forced pass of the yes-classes, SAM image encoder), then
  decode every trial (float16 F_v; attention maps, cosines and SAM embedding in float32).
- naive: methods/fseg/reference.py per trial and image (vision tower, ``generate`` per class
  over the whole sequence, a full forward with hidden states and attentions per yes-class, SAM
  ``set_image`` + ``predict``), as the paper's code runs a configuration. It is timed on the
  first ``--naive-trials`` trials of the first ``--naive-images`` images and scaled to all
  trials and images (its cost does not depend on the knobs); the output says so.
The last line is ``ratio=<naive/ours> evidence_mb=<MB per image>`` (MB = 10^6 bytes).

``--precision N``: the tiny LLaVA-1.5 / 1.6 + tiny SAM, N random images per model, evidence
extracted in float32 and decoded on ``--trials`` knob samples each, against the same evidence
with F_v, the attention maps and / or the SAM embedding rounded to float16: the share of label
maps equal to float32's and the pixel agreement, mean and worst.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    add_device_args,
    device_line,
    smooth_image,
    start_device,
    steady_malloc,
)
from bench.real_size import build_fseg  # noqa: E402
from methods.base import ClassSet, Evidence  # noqa: E402
from methods.fseg.qap import canonical_answer, question_ids  # noqa: E402
from methods.fseg.reference import straight_labels  # noqa: E402
from methods.fseg.segmenter import FSegSegmenter  # noqa: E402
from methods.spec import load_method_spec  # noqa: E402
from search.core.config import resolve  # noqa: E402
from search.core.space import sample_value  # noqa: E402


def trials(n: int, seed: int, layers: int) -> list[dict]:
    """Trial 0: the paper's defaults, 7..13 of 32 scaled to ``layers``; then YAML samples with
    l_s in 1..layers and l_span keeping l_e <= layers."""
    r = resolve(load_method_spec("fseg"), backbone="llava-1.5-7b", dataset="voc21")
    rng = np.random.default_rng(seed)
    ls = max(1, round(r.defaults["l_s"] * layers / 32))
    out = [{**r.defaults, "l_s": ls,
            "l_span": min(layers - ls, round(r.defaults["l_span"] * layers / 32))}]
    while len(out) < n:
        p = {**r.defaults, **{k: sample_value(v, rng) for k, v in r.space.items()}}
        p["l_s"] = int(rng.integers(1, layers + 1))
        p["l_span"] = int(rng.integers(0, layers - p["l_s"] + 1))
        out.append(p)
    return out[:n]


class ScriptedQAP:
    """Forward hook on the LLaVA model: after a class's question (input ids ending in it) the
    logits of each following forward are replaced so that greedy decoding spells
    ``answers[name]`` then EOS. Every forward runs as it would; only the argmax is chosen."""

    def __init__(self, seg: FSegSegmenter, answers: dict[str, str]):
        tok, tpl = seg.llava.tokenizer, seg.llava.template
        self.questions = {tuple(question_ids(tok, tpl, n)): n for n in answers}
        self.scripts = {n: [*tok(a, add_special_tokens=False)["input_ids"], tok.eos_token_id]
                        for n, a in answers.items()}
        self.todo: list[int] = []

    def __call__(self, module, args, kwargs, out):
        ids = kwargs["input_ids"][0].tolist()
        for q, name in self.questions.items():
            if tuple(ids[-len(q):]) == q:
                self.todo = list(self.scripts[name])
        if self.todo and out.logits is not None:
            logits = torch.full_like(out.logits, -1e4)
            logits[..., self.todo.pop(0)] = 1e4
            out.logits = logits
        return out


def precision(args: argparse.Namespace) -> int:
    """``--precision``: float16-rounded evidence against float32 on the tiny models."""
    from methods.fseg import SEGMENTER

    spec = load_method_spec("fseg")
    rng = np.random.default_rng(args.seed)
    classes = ClassSet.from_names(["cat", "dog", "person"], background=True)
    rows: dict[str, list[float]] = {
        "float16 F_v, attention, SAM embedding (the old default)": [],
        "float16 SAM embedding only": [], "float16 attention maps only": [],
        "float16 F_v only (the default now)": []}
    for name in ("tiny", "tiny-next"):
        r = resolve(spec, backbone=name, dataset="voc21")
        seg = SEGMENTER.from_spec(r.backbone, {**r.settings, "evidence_dtype": "float32",
                                               "qa": "present"})
        for _ in range(args.precision):
            h, w = (int(v) for v in rng.integers(24, 97, 2))
            ev = seg.extract(smooth_image(rng, h, w), classes,
                             sorted(rng.choice([1, 2, 3], int(rng.integers(1, 4)), False)))
            half = {k: v.half().float() for k, v in ev.tensors.items()
                    if k in ("fv", "attn", "sam_embedding")}
            variants = [Evidence({**ev.tensors, **{k: half[k] for k in ks}}, ev.meta)
                        for ks in (("fv", "attn", "sam_embedding"), ("sam_embedding",),
                                   ("attn",), ("fv",))]
            for _ in range(args.trials):
                p = {**r.defaults, **{k: sample_value(v, rng) for k, v in r.space.items()}}
                ref = seg.decode(ev, p)
                for key, var in zip(rows, variants):
                    rows[key].append(float((seg.decode(var, p) == ref).mean()))
    n = len(next(iter(rows.values())))
    print(f"fseg precision: tiny + tiny-next, {args.precision} images each, {args.trials} knob "
          f"samples per image ({n} label maps per variant), against float32 evidence")
    for key, agree in rows.items():
        a = np.array(agree)
        print(f"{key}: identical maps {100 * (a == 1).mean():.2f}%, pixel agreement mean "
              f"{100 * a.mean():.3f}% worst {100 * a.min():.2f}%")
    return 0


def params_m(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--trials", type=int, default=64)
    ap.add_argument("--naive-trials", type=int, default=1,
                    help="trials per image timed for the naive search (scaled to --trials)")
    ap.add_argument("--naive-images", type=int, default=1,
                    help="images timed for the naive search (scaled to --images)")
    ap.add_argument("--layers", type=int, default=14,
                    help="Llama blocks of the bench LLM (14: 3.0 B parameters, 12 GB in "
                         "float32; more fits in 24 GiB but not in 10 minutes on 2 cores)")
    ap.add_argument("--width", type=int, default=4096, help="Llama width (MLP = 2.6875x)")
    ap.add_argument("--vision-layers", type=int, default=24)
    ap.add_argument("--quick", action="store_true",
                    help="SAM tiny instead of ViT-B and a 4-block 256-wide vision tower")
    ap.add_argument("--size", default="375x500", help="image HxW")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--decode-threads", type=int, default=1,
                    help="torch threads in the knob side of both ours and naive (1: a search's "
                         "settings.decode_threads; 0: torch's setting)")
    ap.add_argument("--class-batch", type=int, default=4, help="settings.class_batch")
    ap.add_argument("--precision", type=int, default=0, metavar="N",
                    help="measure float16 vs float32 evidence on N tiny images per model "
                         "(--trials knob samples each) instead of the timing bench")
    add_device_args(ap)
    args = ap.parse_args(argv)
    if args.precision:
        return precision(args)
    alloc = steady_malloc(argv)
    device = start_device(args.device)
    h, w = (int(v) for v in args.size.split("x"))
    heads = max(1, args.width // 128)
    vis = ({"vision_width": 256, "vision_layers": 4, "vision_heads": 4,
            "vision_intermediate": 1024} if args.quick else
           {"vision_width": 1024, "vision_layers": args.vision_layers, "vision_heads": 16,
            "vision_intermediate": 4096})
    tiny = {"arch": "llava", **vis, "image_size": 336, "patch_size": 14, "width": args.width,
            "layers": args.layers, "heads": heads, "kv_heads": heads,
            "intermediate": int(args.width * 2.6875), "vocab_size": 32064}
    backbone = {"name": "bench", "tiny": tiny, "sam": "tiny" if args.quick else "vit_b",
                "sam_random": True}
    if args.tiny:
        h, w = 60, 80
        backbone = {"name": "bench-tiny", "tiny": {"arch": "llava"}, "sam": "tiny"}
    t0 = time.perf_counter()
    seg = build_fseg(backbone, {"presence_source": "model", "qa": "auto",
                                "max_new_tokens": 32, "evidence_dtype": "float16",
                                "seed": args.seed, "decode_threads": args.decode_threads,
                                "class_batch": args.class_batch}, device)
    model = seg.llava.model.model
    print(f"fseg bench: LLM {seg.num_layers} Llama blocks x width "
          f"{model.language_model.config.hidden_size} "
          f"({params_m(model.language_model):.0f} M params), vision tower "
          f"{params_m(model.vision_tower):.0f} M, SAM {backbone['sam']} "
          f"{params_m(seg.sam):.0f} M (random weights, {seg.llava.dtype}, on {device}, built "
          f"in {time.perf_counter() - t0:.0f} s); {args.images} images {h}x{w}, 4 classes (3 "
          f"answered yes) + background, presence from the model's QAP (scripted answers), "
          f"{args.trials} trials, {torch.get_num_threads()} threads; {alloc}")
    classes = ClassSet.from_names(["cat", "dog", "person", "bird"], background=True)
    answers = {n: canonical_answer(n) for n in ("cat", "dog", "person")}
    script = ScriptedQAP(seg, {**answers, "bird": "no."})
    seg.llava.model.register_forward_hook(script, with_kwargs=True)
    present = None                                  # presence from the model, both sides
    rng = np.random.default_rng(args.seed)
    images = [smooth_image(rng, h, w) for _ in range(args.images)]
    plan = trials(args.trials, args.seed, seg.num_layers)

    t_extract = t_decode = 0.0
    evidence_mb, evidences = [], []
    for img in images:
        t0 = time.perf_counter()
        ev = seg.extract(img, classes, present)
        t_extract += time.perf_counter() - t0
        assert ev.meta["qa"] == "model" and ev.meta["yes"] == [1, 2, 3], ev.meta["answers"]
        evidence_mb.append(ev.nbytes() / 1e6)
        evidences.append(ev)
        t0 = time.perf_counter()
        for p in plan:
            seg.decode(ev, p)
        t_decode += time.perf_counter() - t0
    ours = t_extract + t_decode
    n_dec = args.images * len(plan)
    print(f"ours:  extract {t_extract:.1f} s ({t_extract / args.images:.1f} s/image) + "
          f"{n_dec} decodes {t_decode:.1f} s ({1000 * t_decode / n_dec:.0f} ms each) "
          f"= {ours:.1f} s")

    k = max(1, min(args.naive_trials, len(plan)))
    m = max(1, min(args.naive_images, len(images)))
    t_naive, agree = 0.0, []
    for img, ev in zip(images[:m], evidences[:m]):
        for p in plan[:k]:
            t0 = time.perf_counter()
            lab = straight_labels(seg, img, classes, p, present)
            t_naive += time.perf_counter() - t0
            agree.append(float((lab == seg.decode(ev, p)).mean()))
    per = t_naive / (m * k)
    naive = per * args.images * len(plan)
    print(f"naive: timed {m * k} straight runs (first {k} trial(s) of the first {m} image(s)), "
          f"{per:.1f} s each, scaled to {args.images} x {len(plan)} = {naive:.0f} s; label "
          f"agreement with ours {100 * np.mean(agree):.2f}%")
    mb = float(np.mean(evidence_mb))
    print(f"evidence: {mb:.2f} MB per image (float16 F_v; float32 attention maps, cosines, "
          f"SAM embedding; max {max(evidence_mb):.2f})")
    print(device_line(device, args.images, t_extract, len(plan), t_decode))
    print(f"ratio={naive / ours:.1f} evidence_mb={mb:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
