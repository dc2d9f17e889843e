"""Train a toy BLIP ITM model (``BlipForImageTextRetrieval``) on generated scenes, for `pnp`.

    python -m bench.toy_blip_train --out /tmp/toy-blip            # trained model directory
    python -m bench.toy_blip_train --steps 3 --out /tmp/t --init-out /tmp/t0   # a quick check

The real transformers class from a tiny config built as ``methods/pnp/backbone.py`` builds the
``tiny`` backbone (``tiny_config``, the offline word-piece ``tiny_tokenizer`` with ``[ENC]``),
only wider and deeper (:data:`RECIPE`), trained as BLIP's retrieval model is, on image-caption
pairs only (no mask, no dense loss):

- ITC: unimodal image ``[CLS]`` and text ``[CLS]`` features (``vision_proj`` / ``text_proj``,
  BLIP's ``use_itm_head=False`` path), symmetric InfoNCE over the batch, learned temperature;
- ITM: the text encoder with cross-attention to the image patches, ``[ENC]`` first, the
  ``itm_head`` on it, cross entropy on the positive pairs and one negative caption per image:
  a present class swapped for an absent one, an absent class added, or another scene's caption
  (:data:`RECIPE` ``negatives``). The absent classes come from the things the painter draws, so
  the negative can only be told from the positive by looking at the image.

Images are VOC-style scenes of ``search.data.synthetic.scene`` painted at ``scene_size`` (the
held-out sets' size) and square-resized (bicubic) to the model's input, as the pnp segmenter
does. Captions are the pnp prompt: ``"a picture of"`` and the present classes' prompt names,
squashed as ``settings.squash_names`` does (``"tvmonitor"``), in random order.

The output is a ``save_pretrained`` directory (safetensors model, tokenizer, image processor)
that the pnp backbone path loads (``{"arch": "blip", "path": DIR}``), plus ``recipe.json``
(the recipe, seconds, final losses, the commit). ``--init-out`` writes the untrained weights of
the same config and seed: the random-weights baseline of bench/toy_blip.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from bench.toy_clip_train import commit, optimiser
from methods.pnp.backbone import CLIP_MEAN, CLIP_STD, TINY_DEFAULTS, tiny_config, tiny_tokenizer
from methods.pnp.text import class_text
from search.data.synthetic import STYLES, scene

#: The one place the weights are defined by: architecture, data, optimisation, seed.
RECIPE: dict[str, Any] = {
    "tiny": {"width": 64, "layers": 4, "heads": 4, "image_size": 64, "patch_size": 8,
             "intermediate": 256},
    "vision_init_std": 0.02,        # BERT's; the random-weights tiny entry uses 0.2
    "layout": "voc",
    "scene_size": [96, 128],        # painted at the held-out size, resized to image_size
    "prompt_prefix": "a picture of",
    "negatives": {"swap": 0.4, "add": 0.3, "other": 0.3},
    "steps": 800,
    "batch": 48,
    "lr": 5e-4,
    "weight_decay": 0.05,
    "warmup": 50,
    "itm_weight": 1.0,
    "seed": 0,
    "threads": 1,                    # 2 threads under a shared load: 5-10x slower
}


def build(recipe: dict) -> tuple[torch.nn.Module, Any]:
    """(``BlipForImageTextRetrieval`` with seeded random weights, the tiny tokenizer)."""
    from transformers import BlipForImageTextRetrieval

    tok = tiny_tokenizer("blip")
    config = tiny_config("blip", {**TINY_DEFAULTS, **recipe["tiny"]}, len(tok), tok)
    config.vision_config.initializer_range = float(recipe["vision_init_std"])
    config._attn_implementation = "eager"
    torch.manual_seed(int(recipe["seed"]))
    return BlipForImageTextRetrieval(config), tok


def caption(names: list[str], rng: np.random.Generator, prefix: str) -> str:
    """The pnp prompt of ``names`` (squashed prompt names), in random order."""
    order = [names[i] for i in rng.permutation(len(names))]
    return " ".join([prefix, *order])


def negative(names: list[str], rng: np.random.Generator, things: list[str],
             other: list[str], recipe: dict) -> list[str]:
    """The class list of a negative caption for an image showing ``names`` (see the doc)."""
    kinds = list(recipe["negatives"])
    p = np.array([recipe["negatives"][k] for k in kinds], np.float64)
    absent = [t for t in things if t not in names]
    for _ in range(8):
        kind = kinds[int(rng.choice(len(kinds), p=p / p.sum()))]
        if kind == "swap" and names and absent:
            out = list(names)
            out[int(rng.integers(len(out)))] = absent[int(rng.integers(len(absent)))]
            return out
        if kind == "add" and absent:
            return [*names, absent[int(rng.integers(len(absent)))]]
        if kind == "other" and other and sorted(other) != sorted(names):
            return list(other)
    return [absent[0]] if absent else ["sofa"]


def batch(rng: np.random.Generator, recipe: dict) -> tuple[torch.Tensor, list[list[str]],
                                                           list[list[str]]]:
    """Normalised pixels ``[B, 3, S, S]``, the positive and the negative class lists."""
    s = int(recipe["tiny"]["image_size"])
    things = [class_text(t, True) for t in STYLES[recipe["layout"]].things]
    images, pos = [], []
    for _ in range(int(recipe["batch"])):
        img, names = scene(recipe["layout"], rng, tuple(recipe["scene_size"]))
        images.append(np.asarray(Image.fromarray(img).resize((s, s), Image.BICUBIC)))
        pos.append([class_text(n, True) for n in names])
    neg = [negative(pos[i], rng, things, pos[(i + 1) % len(pos)], recipe)
           for i in range(len(pos))]
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std, pos, neg


def tokens(tok: Any, texts: list[str], enc: int | None = None) -> tuple[torch.Tensor, ...]:
    t = tok(texts, padding=True, return_tensors="pt")
    ids = t["input_ids"].clone()
    if enc is not None:
        ids[:, 0] = enc
    return ids, t["attention_mask"]


def losses(model: torch.nn.Module, tok: Any, pixels: torch.Tensor, pos: list[str],
           neg: list[str], logit_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ITC loss, ITM loss) of one batch."""
    image = model.vision_model(pixel_values=pixels).last_hidden_state
    ids, mask = tokens(tok, pos)
    text = model.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    img_feat = F.normalize(model.vision_proj(image[:, 0]), dim=-1)
    txt_feat = F.normalize(model.text_proj(text[:, 0]), dim=-1)
    logits = logit_scale.exp() * img_feat @ txt_feat.t()
    # Scenes can share a caption: every pair with the same text is a positive.
    same = torch.tensor([[a == b for b in pos] for a in pos], dtype=torch.float32)
    target = same / same.sum(1, keepdim=True)
    itc = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
    enc = tok.convert_tokens_to_ids("[ENC]")
    ids, mask = tokens(tok, pos + neg, enc)
    both = torch.cat([image, image])
    out = model.text_encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=both,
                             encoder_attention_mask=torch.ones(both.shape[:-1],
                                                               dtype=torch.long))
    itm_logits = model.itm_head(out.last_hidden_state[:, 0])
    labels = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).long()
    return itc, F.cross_entropy(itm_logits, labels)


def train(recipe: dict, log_every: int = 50, init_out: Path | None = None
          ) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """Train the toy BLIP of ``recipe``; returns (model, tokenizer, provenance)."""
    torch.set_num_threads(int(recipe["threads"]))
    model, tok = build(recipe)
    if init_out is not None:
        save_model(model, tok, {"recipe": recipe, "steps_trained": 0}, init_out)
    logit_scale = torch.nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))
    params = [*model.named_parameters(), ("logit_scale", logit_scale)]
    opt, sched = optimiser(params, recipe, "embed")
    steps = int(recipe["steps"])
    rng = np.random.default_rng(int(recipe["seed"]))
    prefix = recipe["prompt_prefix"]
    model.train()
    t0, avg = time.perf_counter(), None
    for step in range(steps):
        pixels, pos, neg = batch(rng, recipe)
        pos_t = [caption(n, rng, prefix) for n in pos]
        neg_t = [caption(n, rng, prefix) for n in neg]
        itc, itm = losses(model, tok, pixels, pos_t, neg_t, logit_scale)
        loss = itc + float(recipe["itm_weight"]) * itm
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            logit_scale.clamp_(0, np.log(100))
        now = np.array([float(itc.detach()), float(itm.detach())])
        avg = now if avg is None else 0.9 * avg + 0.1 * now
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps}  itc {avg[0]:.3f}  itm {avg[1]:.3f}  "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
    model.eval()
    meta = {"recipe": recipe, "steps_trained": steps,
            "seconds": round(time.perf_counter() - t0, 1),
            "final_itc": round(float(avg[0]), 4), "final_itm": round(float(avg[1]), 4),
            "torch": torch.__version__, "script": "bench/toy_blip_train.py",
            "commit": commit(("bench/toy_blip_train.py", "search/data/synthetic.py"))}
    return model, tok, meta


def save_model(model: torch.nn.Module, tok: Any, meta: dict[str, Any], out: Path) -> None:
    """A directory the pnp backbone ``path`` loads: model (safetensors), tokenizer, image
    processor (the CLIP mean/std), and ``recipe.json``; written into a private temporary
    directory beside ``out`` and renamed into place whole (never a half-written model)."""
    import shutil
    import tempfile

    from transformers import BlipImageProcessor

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        s = int(model.config.vision_config.image_size)
        BlipImageProcessor(image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
                           size={"height": s, "width": s}).save_pretrained(tmp)
        (tmp / "recipe.json").write_text(json.dumps(meta, indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.toy_blip_train",
                                description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="the trained model's directory")
    p.add_argument("--init-out", type=Path, help="also write the untrained weights here")
    p.add_argument("--steps", type=int, help=f"default {RECIPE['steps']}")
    p.add_argument("--seed", type=int, help=f"default {RECIPE['seed']}")
    a = p.parse_args(argv)
    recipe = {**RECIPE, **({"steps": a.steps} if a.steps else {}),
              **({"seed": a.seed} if a.seed is not None else {})}
    model, tok, meta = train(recipe, init_out=a.init_out)
    save_model(model, tok, meta, a.out)
    print(f"wrote {a.out} ({meta['seconds']:.0f} s of training, final itc {meta['final_itc']}, "
          f"itm {meta['final_itm']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
