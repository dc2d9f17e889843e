"""The label-free CLIP contrastive reward of PnP-OVSS (poster Eq. 4-5), scored with open_clip.

For an image I with image-level labels K(I) and a predicted label map, each class k in K(I)
*wins* when CLIP finds k more likely in the masked image than in a black image::

    Pr(J, k)  = exp(f(J, k) / T) / sum_{k' in C(I)} exp(f(J, k') / T)           (Eq. 5)
    win(I, k) = 1[ Pr(M^(k) (x) I, k) > Pr(0, k) ]                              (Eq. 4)

f is the cosine similarity of CLIP's image and text embeddings, T the temperature (0.01),
M^(k) (x) I keeps the pixels the prediction labels k and blacks out the rest, 0 is the black
image, and C(I) the candidate set of the softmax: the image's own labels (``candidates: image``,
the reference code) or every foreground class (``candidates: dataset``). A trial's reward is the
fraction of won (image, class) pairs; see docs/reward.md for why, and for the single-class case.

Cost: CLIP sees the black image once per reward object (its Pr once per candidate set), the
texts once per ClassSet, and a batch's masked images in one call (chunks of ``clip_batch_size``).
An empty mask cannot win (its masked image *is* the black image) and skips CLIP. Usage:
``acc = ClipContrastiveReward.from_spec(backbone, settings, classes).new()``, then
``acc.update(image, pred, present=[3, 7])`` per image (never a dense label) and ``acc.value()``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from methods.base import ClassSet, OvssError, check_image

DEFAULT_SETTINGS: dict[str, Any] = {
    "temperature": 0.01, "candidates": "image", "templates": ["{}"], "mask_blur": 0.0,
    "mask_threshold": 0.5, "batch_size": 8, "clip_batch_size": 64, "seed": 0,
}
CANDIDATE_RULES = ("image", "dataset")


# --- the formulas ------------------------------------------------------------------------------
def class_probability(image_features: torch.Tensor, text_features: torch.Tensor,
                      temperature: float, candidates: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 5, Pr(J, k): softmax over the candidate classes of the CLIP similarity / T.

    image_features: [N, D] float, L2-normalised (an all-zero row, e.g. of a degenerate model,
                    gives the uniform distribution over the candidates).
    text_features:  [C, D] float, L2-normalised, one row per class label value.
    candidates:     [N, C] bool, the classes k' of each row's softmax (at least one per row);
                    None = all C classes.
    Returns [N, C] float in [0, 1]: each row sums to 1 over its candidates, 0 elsewhere.
    """
    logits = image_features @ text_features.T / temperature
    if candidates is not None:
        logits = logits.masked_fill(~candidates, float("-inf"))
    return logits.softmax(dim=-1)


def contrastive_wins(p_masked: torch.Tensor, p_black: torch.Tensor) -> torch.Tensor:
    """Eq. 4's indicator 1[Pr(M^(k) (x) I, k) > Pr(0, k)]: [P] float, [P] float -> [P] bool."""
    return p_masked > p_black


def reward_terms(masked_features: torch.Tensor, black_features: torch.Tensor,
                 text_features: torch.Tensor, target: torch.Tensor, candidates: torch.Tensor,
                 temperature: float) -> torch.Tensor:
    """Eq. 4 for P (image, class) pairs at once, from L2-normalised CLIP embeddings: masked
    images M^(k) (x) I [P, D], the black image 0 [D], class texts [C, D]; target [P] int64 (the
    class k of each pair), candidates [P, C] bool (its softmax's classes). -> [P] bool wins."""
    idx = target[:, None]
    p_masked = class_probability(masked_features, text_features, temperature, candidates)
    p_black = class_probability(black_features[None].expand(len(target), -1), text_features,
                                temperature, candidates)
    return contrastive_wins(p_masked.gather(1, idx)[:, 0], p_black.gather(1, idx)[:, 0])


def masked_image(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """M^(k) (x) I: [.., 3, S, S] float in [0, 1] times [.., S, S] bool; black off the mask."""
    return image * mask[..., None, :, :].to(image.dtype)


def blur_and_rebinarise(masks: torch.Tensor, sigma: float, threshold: float) -> torch.Tensor:
    """The reference's mask clean-up: Gaussian blur (sigma in px), per-mask min-max, > threshold.

    masks: [K, S, S] float in [0, 1]. Returns [K, S, S] bool. A constant mask (all on) stays as
    it is instead of dividing 0 by 0.
    """
    radius = max(1, min(math.ceil(3 * sigma), masks.shape[-1] - 1))
    x = torch.arange(-radius, radius + 1, device=masks.device, dtype=masks.dtype)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    m = masks[:, None]
    m = F.conv2d(F.pad(m, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    m = F.conv2d(F.pad(m, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))[:, 0]
    lo = m.amin(dim=(-2, -1), keepdim=True)
    span = m.amax(dim=(-2, -1), keepdim=True) - lo
    norm = torch.where(span > 1e-6, (m - lo) / span.clamp_min(1e-6), masks)
    return norm > threshold


# --- loading -----------------------------------------------------------------------------------
def load_clip(backbone: Mapping[str, Any], seed: int = 0,
              device: str = "cpu") -> tuple[torch.nn.Module, Callable, str]:
    """An open_clip model (eval mode, on ``device``), its tokenizer and its model name.

    backbone: as in ``methods.open_clip_backbone.load_clip`` (an open_clip name and pretrained
    tag, a local ``path``, or a ``tiny`` config with random weights seeded by ``seed``). Raises
    OvssError naming the model and weights when they cannot load.
    """
    import open_clip

    from methods.open_clip_backbone import load_clip as _load

    model, name = _load(backbone, seed, device, what="clip reward")
    return model, open_clip.get_tokenizer(name), name


_SETTING_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "temperature": (lambda v: float(v) > 0, "a number > 0"),
    "candidates": (lambda v: v in CANDIDATE_RULES, " or ".join(CANDIDATE_RULES)),
    "templates": (lambda v: isinstance(v, (list, tuple)) and len(v) > 0
                  and all("{}" in str(t) for t in v), 'a list of strings with "{}"'),
    "mask_blur": (lambda v: float(v) >= 0, "a number >= 0"),
    "mask_threshold": (lambda v: 0 <= float(v) < 1, "a number in [0, 1)"),
    "batch_size": (lambda v: int(v) >= 1, "an integer >= 1"),
    "clip_batch_size": (lambda v: int(v) >= 1, "an integer >= 1"),
    "seed": (lambda v: int(v) == v, "an integer"),
}


def check_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """DEFAULT_SETTINGS updated by ``settings``; raises OvssError on an unknown key or bad value."""
    unknown = sorted(set(settings) - set(DEFAULT_SETTINGS))
    if unknown:
        raise OvssError(f"clip reward: unknown setting {unknown[0]!r} "
                        f"(known: {', '.join(DEFAULT_SETTINGS)})")
    s = {**DEFAULT_SETTINGS, **settings}
    for key, (ok, expected) in _SETTING_CHECKS.items():
        try:
            good = ok(s[key])
        except (TypeError, ValueError):
            good = False
        if not good:
            raise OvssError(f"clip reward: settings.{key}={s[key]!r}: expected {expected}")
    return s


# --- the reward --------------------------------------------------------------------------------
class ClipContrastiveReward:
    """Scores label maps with Eq. 4 using one CLIP model; ``new()`` gives accumulators."""

    def __init__(self, model: torch.nn.Module, tokenizer: Callable, classes: ClassSet,
                 settings: Mapping[str, Any] | None = None, device: str = "cpu"):
        import open_clip

        self.model, self.tokenizer, self.classes = model, tokenizer, classes
        self.settings = check_settings(settings or {})
        self.device = torch.device(device)
        pp = open_clip.get_model_preprocess_cfg(model)
        size = pp.get("size", 224)
        self.image_size = int(size if isinstance(size, int) else size[0])
        self.mean = torch.tensor(pp.get("mean", (0.0,) * 3), device=self.device).view(3, 1, 1)
        self.std = torch.tensor(pp.get("std", (1.0,) * 3), device=self.device).view(3, 1, 1)
        self._text: dict[ClassSet, torch.Tensor] = {}
        self._black: torch.Tensor | None = None
        self._p_black: dict[tuple[int, ...], torch.Tensor] = {}
        self.clip_images = 0  # masked/black images sent through CLIP so far (for the bench)

    @classmethod
    def from_spec(cls, backbone: Mapping[str, Any], settings: Mapping[str, Any],
                  classes: ClassSet, device: str = "cpu") -> ClipContrastiveReward:
        """Build from one ``backbones`` entry of conf/rewards/clip.yaml (plus ``name``) and its
        ``settings``; loading problems raise OvssError."""
        s = check_settings(settings)
        model, tokenizer, _ = load_clip(backbone, int(s["seed"]), device)
        return cls(model, tokenizer, classes, s, device)

    # --- CLIP inputs and embeddings ---
    def clip_input(self, image: np.ndarray) -> torch.Tensor:
        """HxWx3 uint8 -> [3, S, S] float in [0, 1]: a squashing bicubic resize to CLIP's S
        (no crop, so no part of a mask is cut off), normalisation left for ``encode``."""
        x = torch.from_numpy(np.ascontiguousarray(image)).to(self.device)
        x = x.permute(2, 0, 1)[None].float() / 255.0
        s = self.image_size
        x = F.interpolate(x, size=(s, s), mode="bicubic", antialias=True, align_corners=False)
        return x[0].clamp_(0.0, 1.0)

    def class_masks(self, pred: np.ndarray, ks: Sequence[int]) -> torch.Tensor:
        """M^(k) for k in ks: HxW int label map -> [K, S, S] bool at CLIP's input size.

        (pred == k), resized with antialiasing, then either re-binarised at ``mask_threshold``
        or, with ``mask_blur`` > 0, blurred (sigma = mask_blur * S px), min-maxed and re-binarised
        (the reference code's clean-up).
        """
        p = torch.from_numpy(np.ascontiguousarray(pred)).to(self.device)
        k = torch.as_tensor(list(ks), device=self.device, dtype=p.dtype)
        m = (p[None] == k[:, None, None]).float()[:, None]
        s = self.image_size
        m = F.interpolate(m, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        sigma = float(self.settings["mask_blur"]) * s
        thr = float(self.settings["mask_threshold"])
        if sigma > 0:
            return blur_and_rebinarise(m[:, 0], sigma, thr)
        return m[:, 0] > thr

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] float in [0, 1] -> [N, D] L2-normalised CLIP image embeddings, in chunks
        of ``clip_batch_size`` images per forward."""
        chunk = int(self.settings["clip_batch_size"])
        out = [self.model.encode_image((pixels[i:i + chunk] - self.mean) / self.std)
               for i in range(0, len(pixels), chunk)]
        self.clip_images += len(pixels)
        return F.normalize(torch.cat(out).float(), dim=-1)

    @torch.inference_mode()
    def text_features(self, classes: ClassSet | None = None) -> torch.Tensor:
        """[C, D] L2-normalised text embedding per label value: the mean over the class's prompts
        and ``templates``, re-normalised; a zero row for "background" (never a candidate).
        Computed once per ClassSet."""
        classes = classes or self.classes
        if classes not in self._text:
            fg = classes.foreground
            texts, owner = [], []
            for c in fg:
                for prompt in classes.prompts[c]:
                    for template in self.settings["templates"]:
                        texts.append(str(template).format(prompt))
                        owner.append(c)
            tokens = self.tokenizer(texts).to(self.device)
            chunk = 4 * int(self.settings["clip_batch_size"])
            emb = F.normalize(torch.cat([self.model.encode_text(tokens[i:i + chunk]) for i in
                                         range(0, len(tokens), chunk)]).float(), dim=-1)
            feats = torch.zeros(len(classes.names), emb.shape[1], device=self.device)
            feats.index_add_(0, torch.as_tensor(owner, device=self.device), emb)
            self._text[classes] = F.normalize(feats, dim=-1)
        return self._text[classes]

    def black_features(self) -> torch.Tensor:
        """[D] embedding of the black image 0 (computed once)."""
        if self._black is None:
            s = self.image_size
            self._black = self.encode(torch.zeros(1, 3, s, s, device=self.device))[0]
        return self._black

    def black_probability(self, candidates: tuple[int, ...]) -> torch.Tensor:
        """[C] Pr(0, k) for every k under the softmax over ``candidates`` (once per set)."""
        if candidates not in self._p_black:
            text = self.text_features()
            row = torch.zeros(1, len(text), dtype=torch.bool, device=self.device)
            row[0, list(candidates)] = True
            self._p_black[candidates] = class_probability(
                self.black_features()[None].double(), text.double(),
                float(self.settings["temperature"]), row)[0]
        return self._p_black[candidates]

    def candidate_set(self, labels: Sequence[int]) -> tuple[int, ...]:
        """C(I): the image's labels (``candidates: image``) or all foreground classes."""
        if self.settings["candidates"] == "dataset":
            return tuple(self.classes.foreground)
        return tuple(labels)

    def image_labels(self, present: Sequence[int] | None, what: str) -> list[int]:
        """K(I): the image's foreground labels, sorted and unique (background dropped)."""
        if present is None:
            raise OvssError(f"{what}: the clip reward needs the image-level labels (present)")
        n = len(self.classes.names)
        bad = [int(c) for c in present if not 0 <= int(c) < n]
        if bad:
            raise OvssError(f"{what}: image-level label {bad[0]} is outside 0..{n - 1}")
        fg = set(self.classes.foreground)
        return sorted({int(c) for c in present} & fg)

    # --- scoring ---
    def score_batch(self, images: Sequence[np.ndarray], preds: Sequence[np.ndarray],
                    presents: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
        """Eq. 4 for a batch of images, with one batched CLIP call for all their masked images.

        images:   HxWx3 uint8 RGB in [0, 255].
        preds:    HxW int label maps (same size as their image), values = class label values.
        presents: the image-level labels of each image (label values; background is ignored).
        Returns per image ``(wins, n_classes)``: n_classes = |K(I)| scored classes, 0 when the
        softmax would have fewer than 2 candidates (Pr = 1 for both images: never a win).
        """
        if not len(images) == len(preds) == len(presents):
            raise OvssError(f"score_batch: {len(images)} images, {len(preds)} label maps and "
                            f"{len(presents)} label lists")
        temperature = float(self.settings["temperature"])
        n_text = len(self.text_features())
        pixels, targets, cand_rows, cand_sets, owners = [], [], [], [], []
        counts = [0] * len(images)
        for i, (image, pred, present) in enumerate(zip(images, preds, presents)):
            check_image(image, f"image {i}")
            pred = np.asarray(pred)
            if pred.shape != image.shape[:2]:
                raise OvssError(f"image {i}: label map of size {pred.shape}, expected "
                                f"{image.shape[:2]}")
            labels = self.image_labels(present, f"image {i}")
            cands = self.candidate_set(labels)
            if len(cands) < 2 or not labels:
                continue
            counts[i] = len(labels)
            masks = self.class_masks(pred, labels)
            keep = masks.flatten(1).any(dim=1).tolist()  # an empty mask is the black image
            if not any(keep):
                continue
            image_r = self.clip_input(image)
            row = torch.zeros(n_text, dtype=torch.bool, device=self.device)
            row[list(cands)] = True
            for k, mask, ok in zip(labels, masks, keep):
                if ok:
                    pixels.append(masked_image(image_r, mask))
                    targets.append(k)
                    cand_rows.append(row)
                    cand_sets.append(cands)
                    owners.append(i)
        wins = [0] * len(images)
        if pixels:
            feats = self.encode(torch.stack(pixels))
            cand = torch.stack(cand_rows)
            target = torch.as_tensor(targets, device=self.device)
            p_masked = class_probability(feats.double(), self.text_features().double(),
                                         temperature, cand)
            p_masked = p_masked.gather(1, target[:, None])[:, 0]
            p_black = torch.stack([self.black_probability(c)[k]
                                   for c, k in zip(cand_sets, targets)])
            for i, won in zip(owners, contrastive_wins(p_masked, p_black).tolist()):
                wins[i] += int(won)
        return list(zip(wins, counts))

    def new(self) -> ClipRewardAccumulator:
        """A fresh accumulator (one per trial and rung)."""
        return ClipRewardAccumulator(self, int(self.settings["batch_size"]))


class ClipRewardAccumulator:
    """Buffers (image, label map, labels) and scores them ``batch_size`` at a time.

    ``value()`` = won (image, class) pairs / scored pairs (0.0 before any pair is scored).
    Dense labels are never read: ``label`` is accepted for the shared accumulator shape only.
    """

    def __init__(self, reward: ClipContrastiveReward, batch_size: int = 8):
        self.reward, self.batch_size = reward, max(1, int(batch_size))
        self._buffer: list[tuple[np.ndarray, np.ndarray, list[int]]] = []
        self.per_image: list[tuple[int, int]] = []

    def update(self, image: np.ndarray, pred: np.ndarray, label: Any = None,
               present: Sequence[int] | None = None) -> None:
        """image: HxWx3 uint8; pred: HxW int label map; present: the image-level labels."""
        where = f"image {len(self.per_image) + len(self._buffer)} of the trial"
        labels = self.reward.image_labels(present, where)
        self._buffer.append((image, np.asarray(pred), labels))
        if len(self._buffer) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        """Score every buffered image (one batched CLIP call)."""
        if self._buffer:
            images, preds, presents = zip(*self._buffer)
            self._buffer = []
            self.per_image.extend(self.reward.score_batch(images, preds, presents))

    def value(self) -> float:
        """Fraction of won (image, class) pairs, in [0, 1]; higher is better."""
        self.flush()
        pairs = sum(n for _, n in self.per_image)
        return sum(w for w, _ in self.per_image) / pairs if pairs else 0.0

    def details(self) -> dict[str, float]:
        """``clip_wins``, ``clip_pairs``, ``clip_images``, ``clip_unscored_images`` (fewer than 2
        candidates or no labels) and ``clip_image_mean`` (mean of per-image win fractions)."""
        self.flush()
        scored = [w / n for w, n in self.per_image if n]
        return {
            "clip_wins": float(sum(w for w, _ in self.per_image)),
            "clip_pairs": float(sum(n for _, n in self.per_image)),
            "clip_images": float(len(self.per_image)),
            "clip_unscored_images": float(len(self.per_image) - len(scored)),
            "clip_image_mean": float(np.mean(scored)) if scored else float("nan"),
        }


def why_constant(details: Sequence[Mapping[str, float]]) -> str:
    """One line on why the reward came out the same for every trial, from the trials'
    :meth:`ClipRewardAccumulator.details`-style counts (``clip_wins``, ``clip_pairs``,
    ``clip_images``, ``clip_unscored_images``)."""
    def total(key: str) -> float:
        return sum(float(d.get(key, 0.0)) for d in details)

    if details and total("clip_unscored_images") >= total("clip_images") > 0:
        return ("no image could be scored: each needs image-level labels and at least two "
                "candidate classes (reward setting `candidates`)")
    if details and total("clip_wins") == 0:
        return ("no predicted mask of a labelled class beat the black image in any trial: the "
                "masks miss the labelled classes, or the reward's CLIP cannot tell the masked "
                "images apart (random weights)")
    return ("every trial's masks won the same (image, class) pairs: the knobs searched do not "
            "change which labelled classes the masks cover on these images")
