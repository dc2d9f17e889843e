"""Tiny real models for the second-vision-model tests (tests/test_clipseg_proxy.py,
tests/test_clipseg_trident.py): an open_clip CLIP with 4 heads whose native grid is 7 x 7 at 56 px
(so no positional interpolation on CLIP's side: ProxyCLIP and Trident resize it with a
scale_factor, we by size, the family's documented difference), randomised biases, gains,
layer scales and relative positions, and the knob dict of clipseg."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from methods.clipseg import SEGMENTER

TINY_CLIP = {"name": "tiny56", "tiny": {"width": 64, "layers": 4, "heads": 4, "patch_size": 8,
                                        "image_size": 56}}
VISION = {
    "dino": {"arch": "dino", "tiny": {"hidden": 32, "layers": 2, "heads": 4, "patch": 8,
                                      "image_size": 56}},
    "reg": {"arch": "dinov2_reg", "tiny": {"hidden": 32, "layers": 2, "heads": 4, "patch": 8,
                                           "image_size": 56}},
    "sam": {"arch": "sam", "tiny": {}},
}
SETTINGS = {"protocol": "proxyclip", "dataset": "voc21", "short_side": 56, "window": 56,
            "stride": 28, "templates": "simple", "evidence_dtype": "float32",
            "vision": ["dino", "reg", "sam"], "vision_models": VISION,
            "variants": ["proxyclip"]}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial biases, LayerNorm gains, layer scales and relative positions."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 1:                                    # gains, layer scales
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            elif "rel_pos" in name or "token" in name or "position" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            elif p.ndim >= 2:
                p.mul_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))


def build(settings: dict) -> object:
    s = SEGMENTER.from_spec(TINY_CLIP, settings)
    randomise(s.model.visual, 7)
    vision = {n: s.vision(n) for n in settings["vision"] + ([settings["sam"]]
                                                           if settings.get("sam") else [])}
    for i, m in enumerate(vision.values()):
        randomise(m.module, 11 + i)
    return type(s)(s.model, s.model_name, TINY_CLIP, settings, vision=vision)


def voc_classes():
    from methods.base import ClassSet
    from search.data.spec import load_spec

    spec = load_spec("voc21")
    return ClassSet(tuple(spec.classes), tuple(tuple(p) for p in spec.prompts), True)


def image(h: int, w: int, seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 5, 3)).astype(np.float32)
    big = F.interpolate(torch.from_numpy(small).permute(2, 0, 1)[None], size=(h, w),
                        mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()
    return (big + rng.normal(0, 25, (h, w, 3))).clip(0, 255).astype(np.uint8)


def params(**kw):
    base = {"attention": "proxyclip", "beta": 1.2, "gamma": 3.0, "vision": "dino",
            "bg_threshold": 0.2, "logit_scale": 40.0, "layer": 2, "tau": 6.0, "epsilon": 0.75,
            "dsi_start": -1, "min_pts": 3, "gaussian_std": 5.0, "cos_fac": 1.2,
            "refine_neg_cos": True, "sam_refine": False, "sam_iou_thresh": 0.8,
            "coarse_thresh": 0.2, "minimal_area": 225, "sam_mask_coff": 0.005,
            "pamr_steps": 0, "pamr_dilations": "8,16"}
    return {**base, **kw}


