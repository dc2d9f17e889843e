"""Real-size segmenters with random weights (no download), on any device: one per method, for
tests/test_gpu.py's peak GPU memory of one extraction (and the tiny backbones for its CPU run).

    built = build("clipseg", "cuda")          # real: the shapes below
    ev = built.segmenter.extract(built.image(), built.classes, built.present)

- clipseg: open_clip ViT-B-16 (the default backbone's architecture), the cra protocol
  (short side 448, 448-px windows, stride 224), the 80 ImageNet templates;
- pnp: BLIP-base ITM (BlipConfig's defaults with the released checkpoints' 12 text heads, as
  bench/pnp.py), 336 px (the reference's size), D = 1 (extract's one pass for every layer and head);
- fseg: LLaVA-1.5-7B's shape (CLIP ViT-L/14-336, 32 Llama blocks of width 4096, vocabulary
  32064) and SAM ViT-H; on CUDA built on the GPU (fast; other random weights than a CPU build)
  in float16, as ``settings.dtype: auto`` loads the real model there.
Images: 375 x 500 (a usual Pascal VOC size); classes: the VOC 20 + background, three present.
``size="tiny"``: the method's ``tiny`` backbone from its YAML instead.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from bench.common import smooth_image
from methods.base import ClassSet, Segmenter

VOC = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
       "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
       "train", "tvmonitor")
PRESENT = [8, 12, 15]                      # cat, dog, person
IMAGE = (375, 500)

#: LLaVA-1.5-7B: Vicuna-7B (Llama-2 shape) behind CLIP ViT-L/14 at 336 px.
LLAVA_7B = {"arch": "llava", "vision_width": 1024, "vision_layers": 24, "vision_heads": 16,
            "vision_intermediate": 4096, "image_size": 336, "patch_size": 14, "width": 4096,
            "layers": 32, "heads": 32, "kv_heads": 32, "intermediate": 11008,
            "vocab_size": 32064}


@dataclass
class Built:
    segmenter: Segmenter
    classes: ClassSet
    present: list[int]
    describe: str
    size: tuple[int, int] = IMAGE

    def image(self, seed: int = 0) -> np.ndarray:
        return smooth_image(np.random.default_rng(seed), *self.size)


def params_m(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def build(method: str, device: str, size: str = "real") -> Built:
    classes = ClassSet.from_names(VOC, background=True)
    if size == "tiny":
        return _tiny(method, device, classes)
    if method == "clipseg":
        import open_clip

        from methods.clipseg.segmenter import ClipSegSegmenter

        torch.manual_seed(0)
        model = open_clip.create_model("ViT-B-16", pretrained=None, device=device).eval()
        seg = ClipSegSegmenter(model, "ViT-B-16", {"name": "vit-b16-random"},
                               {"protocol": "cra"}, device)
        return Built(seg, classes, PRESENT, f"open_clip ViT-B-16 ({params_m(model):.0f} M), "
                     "cra protocol (448 px), 80 templates, image 375x500")
    if method == "pnp":
        from transformers import BlipConfig

        from methods.pnp.backbone import random_model, tiny_tokenizer
        from methods.pnp.segmenter import PnPSegmenter

        vlm = random_model("blip", BlipConfig(text_config={"num_attention_heads": 12}),
                           tiny_tokenizer("blip"), 0, device)
        seg = PnPSegmenter(vlm, {"name": "blip-base-random"}, {"image_size": 336}, device)
        return Built(seg, classes, PRESENT, f"BLIP-base ITM ({params_m(vlm.model):.0f} M), "
                     f"336 px, {vlm.layers} x {vlm.heads} layer/heads, image 375x500")
    if method == "fseg":
        return _llava_7b(device, classes)
    raise LookupError(f"no real-size model for method {method!r} in bench/real_size.py")


def _llava_7b(device: str, classes: ClassSet) -> Built:
    backbone = {"name": "llava-1.5-7b-random", "tiny": LLAVA_7B, "sam": "vit_h",
                "sam_random": True}
    settings = {"qa": "present", "evidence_dtype": "float16"}
    seg = build_fseg(backbone, settings, device)
    llava = seg.llava
    lm = llava.model.model
    return Built(seg, classes, PRESENT,
                 f"LLaVA-1.5-7B shape ({params_m(lm.language_model):.0f} M LLM + "
                 f"{params_m(lm.vision_tower):.0f} M vision, {llava.dtype}) + SAM ViT-H "
                 f"({params_m(seg.sam):.0f} M), 3 classes present, image 375x500")


def build_fseg(backbone: dict, settings: dict, device: str):
    """``FSegSegmenter.from_spec`` with its LLaVA built now (not inside a timed extraction), in
    ``settings.dtype`` (auto: float16 on CUDA, as a real checkpoint loads there); on CUDA the
    LLaVA is built on the GPU (seconds instead of minutes for 7 B random weights; other random
    values than a CPU build)."""
    from methods.fseg.segmenter import FSegSegmenter

    seg = FSegSegmenter.from_spec(backbone, settings, device)     # (SAM: built, then moved)
    cuda = str(device).startswith("cuda")
    with torch.device(device) if cuda else contextlib.nullcontext():
        seg.llava                                                        # noqa: B018 (builds)
    return seg


def _tiny(method: str, device: str, classes: ClassSet) -> Built:
    from bench.common import tiny_segmenter

    return Built(tiny_segmenter(method, device), classes, PRESENT, "tiny backbone (its YAML)",
                 size=(60, 80))
