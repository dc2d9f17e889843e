"""PAMR, pixel-adaptive mask refinement (Araslanov and Roth, CVPR 2020), as NACLIP runs it on
the dense logits of any segmenter: a post-processing step, no model.

Official code: visinf/1-stage-wseg d905fca ``models/mods/pamr.py`` (NACLIP 0cac3a6 ``pamr.py``
is the same math). With an image I (K channels) and scores M (C channels) of the same size:

- the neighbours of a pixel p are, for every dilation d of D, the 8 pixels p + d * o,
  o in {-1, 0, 1}^2 without (0, 0), with replicate padding (``LocalAffinity``, pamr.py 10-55);
- sigma_k(p): the (unbiased) std of channel k over the 9 |D| samples of p's neighbourhoods, the
  centre counted once per dilation (``LocalStDev``, 77-103, used at 132);
- w(p, q) = softmax over the 8 |D| neighbours q of mean_k[-|I_k(p) - I_k(q)| /
  (1e-8 + 0.1 sigma_k(p))] (134-136): the affinity, knob-free given I and D;
- T times M(p) <- sum_q w(p, q) M(q) (138-140), no self term.

The refinement is linear in M and acts on every channel alike, so channels can be refined in
chunks (bounded memory) and ``refine(a * M) = a * refine(M)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from methods.base import OvssError

#: Neighbour offsets (dy, dx) in the order of LocalAffinity's 3 x 3 kernels (pamr.py 25-34).
OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
#: The hard-coded constants of pamr.py 134: w's temperature factor and the std's epsilon.
STD_FACTOR, STD_EPS = 0.1, 1e-8
#: Channels x pixels refined at once (float32 elements: 1 M = 4 MB per buffer, which stays in
#: cache: at 375 x 500 with 56 channels, T = 10, D = (8, 16), one thread: 1.5 s, against 4.9 s
#: with all channels at once and 2.0 s one channel at a time).
CHUNK_ELEMENTS = 1 << 20


def parse_dilations(value: str | int | Sequence[int]) -> tuple[int, ...]:
    """The dilation set D from a knob value: ``"8,16"`` (the search space's categorical text),
    an int, or a sequence of ints. OvssError when empty or not positive integers."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
        try:
            dil = tuple(int(p) for p in parts)
        except ValueError:
            raise OvssError(f"pamr_dilations {value!r}: give positive integers separated by "
                            f"commas, e.g. '8,16'") from None
    elif isinstance(value, int) and not isinstance(value, bool):
        dil = (value,)
    else:
        dil = tuple(int(v) for v in value)
    if not dil or any(d < 1 for d in dil):
        raise OvssError(f"pamr_dilations {value!r}: give at least one positive integer, "
                        f"e.g. '8,16'")
    return dil


def _shifted(padded: torch.Tensor, d: int, dy: int, dx: int, h: int, w: int) -> torch.Tensor:
    """The view of a replicate-padded ``... x (h + 2d) x (w + 2d)`` tensor at offset d (dy, dx)."""
    y, x = d + dy * d, d + dx * d
    return padded[..., y:y + h, x:x + w]


def _pad(x: torch.Tensor, d: int) -> torch.Tensor:
    """Replicate padding by d of a C x H x W tensor (as ``F.pad(..., mode='replicate')``)."""
    return F.pad(x[None], [d] * 4, mode="replicate")[0]


def local_affinity(image: torch.Tensor, dilations: Sequence[int]) -> torch.Tensor:
    """PAMR's affinity w of every pixel to its 8 |D| neighbours.

    image: K x H x W float (any per-channel affine normalisation gives the same w, up to the
    1e-8). Returns 8 |D| x H x W float32, each pixel's weights summing to 1 over dim 0, in the
    order (dilation, offset) of :data:`OFFSETS`.
    """
    img = image.float()
    k, h, w = img.shape
    pads = [_pad(img, d) for d in dilations]
    # sigma_k(p) over the 9 |D| samples (the centre once per dilation), two-pass, unbiased
    n = 9 * len(dilations)
    total = torch.zeros_like(img)
    for d, p in zip(dilations, pads):
        total += img
        for dy, dx in OFFSETS:
            total += _shifted(p, d, dy, dx, h, w)
    mean = total / n
    sq = torch.zeros_like(img)
    for d, p in zip(dilations, pads):
        sq += (img - mean) ** 2
        for dy, dx in OFFSETS:
            sq += (_shifted(p, d, dy, dx, h, w) - mean) ** 2
    scale = STD_EPS + STD_FACTOR * (sq / (n - 1)).sqrt()
    logits = torch.stack([(-(img - _shifted(p, d, dy, dx, h, w)).abs() / scale).mean(0)
                          for d, p in zip(dilations, pads) for dy, dx in OFFSETS])
    return torch.softmax(logits, dim=0)


def refine(masks: torch.Tensor, affinity: torch.Tensor, dilations: Sequence[int],
           steps: int) -> torch.Tensor:
    """``steps`` rounds of M(p) <- sum_q w(p, q) M(q).

    masks: C x H x W float32 (scores of any kind: PAMR is linear in them); affinity: 8 |D| x H x
    W from :func:`local_affinity` with the same ``dilations``. Returns C x H x W float32 (a new
    tensor; ``steps`` 0 returns a copy).
    """
    c, h, w = masks.shape
    if affinity.shape != (8 * len(dilations), h, w):
        raise ValueError(f"affinity {tuple(affinity.shape)} does not fit {len(dilations)} "
                         f"dilations on {h} x {w}")
    out = masks.float().clone(memory_format=torch.contiguous_format)   # (a permuted view in)
    chunk = max(1, CHUNK_ELEMENTS // (h * w))
    for c0 in range(0, c, chunk):
        m = out[c0:c0 + chunk]
        for _ in range(int(steps)):
            nxt = torch.zeros_like(m)
            i = 0
            for d in dilations:
                p = _pad(m, d)
                for dy, dx in OFFSETS:
                    nxt.addcmul_(_shifted(p, d, dy, dx, h, w), affinity[i])
                    i += 1
            m = nxt
        out[c0:c0 + chunk] = m
    return out


def pamr(image: torch.Tensor, masks: torch.Tensor, steps: int,
         dilations: Sequence[int]) -> torch.Tensor:
    """PAMR of C x H x W ``masks`` guided by the K x H x W ``image`` (same size; NACLIP resizes
    both to the original image first). ``steps`` 0: the masks unchanged."""
    if steps < 0:
        raise OvssError(f"pamr_steps {steps}: must be 0 (off) or more")
    if steps == 0:
        return masks
    return refine(masks, local_affinity(image, dilations), dilations, steps)
