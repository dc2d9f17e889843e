"""Train the toy CLIP (``--backbone toy-clip``) on generated scenes; write the shipped weights.

    python -m bench.toy_clip_train                       # -> methods/weights/toy-clip.safetensors
    python -m bench.toy_clip_train --steps 3 --out /tmp/t.safetensors     # a quick check

An open_clip ``CLIP`` (the real class, from a tiny config registered with open_clip) trained
contrastively, as CLIP is: each image of a batch against every caption of the batch (symmetric
InfoNCE, learned temperature). Images are scenes of the generated data sets' painter
(``search.data.synthetic.scene``: the VOC-like and the Context-like styles, stuff regions and
things); the caption of an image names the classes painted in it in one of the 80 ImageNet
templates, e.g. "a photo of the cat, sky and person.". Nothing but image-caption pairs is seen:
no mask, no dense loss. Everything the weights depend on is in :data:`RECIPE`; the scenes of
training come from ``RECIPE["seed"]``, never from the held-out seed the evaluations use
(``bench/toy_clip.py``: :data:`HELD_OUT_SEED`).

The file is written float16 (under 16 MB: the token embedding alone is 49408 x text_width),
atomically, with the provenance in its metadata: the recipe, the tiny config, the commit (the
last of the script and the painter, :data:`SOURCES`), the
seconds it took, the final loss and the sha256 of the tensors (``tensor_sha256``: what
``tests/test_toy_clip.py`` checks). The same recipe, seed and thread count give the same file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from methods.io import atomic_write
from methods.open_clip_backbone import SHIPPED_DIR, tiny_model_name
from search.data.synthetic import scene

#: The one place the weights are defined by: architecture, data, optimisation, seed.
RECIPE: dict[str, Any] = {
    "tiny": {"embed_dim": 64, "image_size": 64, "patch_size": 8, "width": 128, "layers": 4,
             "heads": 4, "text_width": 64, "text_layers": 2, "text_heads": 2,
             "context_length": 32},
    "layouts": ["voc", "context"],   # the painters' styles, alternating in a batch
    "scene_size": [64, 64],
    "steps": 500,
    "batch": 128,
    "lr": 1e-3,
    "weight_decay": 0.1,
    "warmup": 50,
    "seed": 0,
    "threads": 2,
}


def caption(names: list[str], rng: np.random.Generator, templates: list) -> str:
    """The classes of a scene, shuffled, in one random ImageNet template."""
    order = [names[i] for i in rng.permutation(len(names))]
    phrase = order[0] if len(order) == 1 else ", ".join(order[:-1]) + " and " + order[-1]
    return templates[int(rng.integers(len(templates)))](phrase)


def batch(rng: np.random.Generator, n: int, recipe: dict, templates: list
          ) -> tuple[np.ndarray, list[str]]:
    images, texts = [], []
    for i in range(n):
        img, names = scene(recipe["layouts"][i % len(recipe["layouts"])], rng,
                           tuple(recipe["scene_size"]))
        images.append(img)
        texts.append(caption(names, rng, templates) if names else templates[0]("scene"))
    return np.stack(images), texts


def tensor_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of the tensors, in name order."""
    h = hashlib.sha256()
    for k in sorted(state):
        v = state[k].contiguous().reshape(-1)
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}|".encode())
        h.update(v.view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


#: The files the weights depend on (the recipe and the painter): their commit is the provenance.
SOURCES = ("bench/toy_clip_train.py", "search/data/synthetic.py")


def commit(sources: tuple[str, ...] = SOURCES) -> str:
    """The last commit of ``sources`` (default :data:`SOURCES`), ``+dirty`` when one of them
    differs from it."""
    repo = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], capture_output=True, text=True, cwd=repo, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""
    try:
        head = git("log", "-1", "--format=%H", "--", *sources)
        dirty = git("status", "--porcelain", "--", *sources)
    except OSError:
        return "?"
    return (head or "?") + ("+dirty" if dirty else "")


def optimiser(params: list[tuple[str, torch.nn.Parameter]], recipe: dict, no_decay: str
              ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with weight decay on the matrices (names without ``no_decay``) and a linear
    warm-up then cosine decay over ``recipe["steps"]`` (the toy CLIP's and the toy BLIP's)."""
    decay = [p for n, p in params if p.ndim >= 2 and no_decay not in n]
    rest = [p for n, p in params if not (p.ndim >= 2 and no_decay not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe["weight_decay"]},
                             {"params": rest, "weight_decay": 0.0}], lr=recipe["lr"])
    steps, warmup = int(recipe["steps"]), int(recipe["warmup"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + np.cos(np.pi * min(1.0, max(0, s - warmup) / max(1, steps - warmup)))))
    return opt, sched


def train(recipe: dict, log_every: int = 50) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Train the toy CLIP of ``recipe``; returns (float16 state dict, provenance)."""
    import open_clip

    torch.set_num_threads(int(recipe["threads"]))
    name = tiny_model_name(recipe["tiny"])
    torch.manual_seed(int(recipe["seed"]))
    model = open_clip.create_model(name, pretrained=None)
    tokenizer = open_clip.get_tokenizer(name)
    templates = list(open_clip.OPENAI_IMAGENET_TEMPLATES)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    opt, sched = optimiser(list(model.named_parameters()), recipe, "embedding")
    steps = int(recipe["steps"])
    rng = np.random.default_rng(int(recipe["seed"]))
    model.train()
    t0, loss_avg = time.perf_counter(), None
    for step in range(steps):
        images, texts = batch(rng, int(recipe["batch"]), recipe, templates)
        pixels = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0 - mean) / std
        img = F.normalize(model.encode_image(pixels), dim=-1)
        txt = F.normalize(model.encode_text(tokenizer(texts)), dim=-1)
        logits = model.logit_scale.exp() * img @ txt.t()
        target = torch.arange(len(texts))
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100))
        loss_now = float(loss.detach())
        loss_avg = loss_now if loss_avg is None else 0.9 * loss_avg + 0.1 * loss_now
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps}  loss {loss_avg:.3f}  "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
    seconds = time.perf_counter() - t0
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()
             if v.is_floating_point()}
    meta = {"recipe": recipe, "tiny": recipe["tiny"], "seconds": round(seconds, 1),
            "final_loss": round(float(loss_avg), 4), "torch": torch.__version__,
            "open_clip": open_clip.__version__, "script": "bench/toy_clip_train.py",
            "commit": commit(), "tensor_sha256": tensor_sha256(state)}
    return state, meta


def write_weights(state: dict[str, torch.Tensor], meta: dict[str, Any], out: Path) -> None:
    """Write the safetensors file atomically (no half-written weights at ``out``)."""
    from safetensors.torch import save as serialise

    data = serialise(state, metadata={k: json.dumps(v) if not isinstance(v, str) else v
                                 for k, v in meta.items()})
    atomic_write(out, data)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.toy_clip_train", description=__doc__.split(
        "\n")[0])
    p.add_argument("--out", type=Path, default=SHIPPED_DIR / "toy-clip.safetensors")
    p.add_argument("--steps", type=int, help=f"default {RECIPE['steps']}")
    p.add_argument("--seed", type=int, help=f"default {RECIPE['seed']}")
    a = p.parse_args(argv)
    recipe = {**RECIPE, **({"steps": a.steps} if a.steps else {}),
              **({"seed": a.seed} if a.seed is not None else {})}
    state, meta = train(recipe)
    write_weights(state, meta, a.out)
    mb = a.out.stat().st_size / 2**20
    print(f"wrote {a.out} ({mb:.1f} MB, {meta['seconds']:.0f} s of training, final loss "
          f"{meta['final_loss']}, tensors sha256 {meta['tensor_sha256'][:12]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
