"""The straight FSeg-LLaVA pipeline: the paper's steps written out once more, one configuration
at a time, as its code would run a trial (ground truth for ``decode(extract(x), p)`` in the
tests, the naive search of ``bench/fseg.py``).

Model side: per class a full ``generate`` (``qa: model``) and a full teacher-forced forward over
the whole sequence with the image (``output_hidden_states``, ``output_attentions``), then
``SamPredictor.set_image`` + ``predict``: no prefix KV cache, no stored maps or entropies, no
SAM embedding reuse. Knob side: every step is transcribed here from the paper (Zhang et al.,
CVPR 2026; ``shared/papers/fseg-llava.txt``, Method, "Key Designs" 2 TVR and 3 VGM + SAM) and
from the choices of docs/fseg.md, with nothing imported from ``formulas.py``, ``pipeline.py``
or ``prompts.py``; morphology is written out as window minima / maxima, components come from
scipy (the pipeline uses OpenCV), SAM from ``SamPredictor`` (the pipeline its own decoder).
Only the LLaVA input plumbing (image tokens and their grid, template, answer tokens) is
shared with extract.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from methods.base import ClassSet, check_image
from methods.fseg.llava_pass import encode_image, pixel_inputs
from methods.fseg.qap import answer_tokens, canonical_answer, is_yes, prefix_ids, question_ids

EIGHT = np.ones((3, 3), dtype=bool)          # 8-connectivity


@torch.no_grad()
def straight_labels(seg: Any, image: np.ndarray, classes: ClassSet, params: Mapping[str, Any],
                    present: Sequence[int] | None = None) -> np.ndarray:
    """The whole FSeg-LLaVA pipeline for one image and one configuration: H x W int64."""
    image = check_image(image)
    llava, s, dev = seg.llava, seg.settings, seg.device
    mode = seg.qa_mode(present)
    base, l_s = int(params["layer_base"]), int(params["l_s"])
    blocks = [l_s + i - base for i in range(int(params["l_span"]) + 1)]   # 0-based, l_s..l_e
    tokens = encode_image(llava, image, bool(s["pad_to_square"]), s["grid"], s["vgm_features"],
                          dev)
    inputs, _ = pixel_inputs(llava, image, bool(s["pad_to_square"]))
    inputs = {k: (v.to(dev, llava.dtype) if v.is_floating_point() else v.to(dev))
              for k, v in inputs.items()}
    prefix = prefix_ids(llava.tokenizer, llava.template, llava.image_token_id, tokens.n_tokens)
    img_pos = [i for i, t in enumerate(prefix) if t == llava.image_token_id]
    grid_pos = [img_pos[int(p)] for p in tokens.positions]
    tok = llava.tokenizer
    yes, d_tilde, m_a = [], [], []
    for c in classes.foreground:                                   # QAP, one question per class
        name = classes.prompts[c][0]
        q = question_ids(tok, llava.template, name)
        if mode == "model":
            ids = torch.tensor([prefix + q], device=dev)
            out = llava.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                       **inputs, do_sample=False, num_beams=1,
                                       max_new_tokens=int(s["max_new_tokens"]),
                                       eos_token_id=tok.eos_token_id,
                                       pad_token_id=tok.pad_token_id)
            text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
            if not is_yes(text):
                continue
        elif c not in set(present or ()):
            continue
        else:
            text = canonical_answer(name)
        ans = answer_tokens(tok, text, name)
        full = torch.tensor([prefix + q + ans.ids], device=dev)
        out = llava.model(input_ids=full, **inputs, output_hidden_states=True,
                          output_attentions=True, logits_to_keep=1)
        start = len(prefix) + len(q)
        d_tilde.append(distance_map(out.hidden_states, [start + i for i in ans.class_tokens],
                                    grid_pos, blocks, params["pool"]))
        s1 = [start + i for i in ans.s1_tokens]
        m_a.append(attention_mask(out.attentions, s1, grid_pos, blocks, params, tokens.grid)
                   if s1 else None)
        yes.append(c)
    h, w = image.shape[:2]
    if not yes:
        return np.zeros((h, w), dtype=np.int64)
    alpha, beta = float(params["alpha"]), float(params["beta"])
    d_f = []
    for dt, ma in zip(d_tilde, m_a):
        tau = min(alpha * float(dt.max()), beta)                  # tau = min(alpha max D~, beta)
        d = torch.where(dt >= tau, dt, torch.zeros_like(dt))      # D
        d_f.append(d * ma if params["fusion"] == "product" and ma is not None else d)
    seg.predictor.set_image(image)
    threads = torch.get_num_threads()   # the knob side with decode's thread setting (the bench
    n = int(s["decode_threads"])        # compares the two like for like)
    try:
        if n > 0:
            torch.set_num_threads(n)
        return vgm_and_sam(seg.predictor, torch.stack(d_f), torch.stack(d_tilde),
                           tokens.fv.float().cpu(), yes, classes.background, (h, w),
                           tokens.grid, tokens.view, params)
    finally:
        torch.set_num_threads(threads)
        seg.predictor.reset_image()


# --- TVR ------------------------------------------------------------------------------------------
def distance_map(hidden: Sequence[torch.Tensor], class_pos: list[int], grid_pos: list[int],
                 blocks: list[int], pool: str) -> torch.Tensor:
    """D~(v_i, t_c^0) = 1/(l_e - l_s + 1) sum_l cos(F^l(v_i), F^l(t_c^0)), F^l = the output of
    block l (``hidden[l + 1]``), per sub-token of the class name, then pooled: -> N."""
    per_token = []
    for t in class_pos:
        total = None
        for b in blocks:
            f = hidden[b + 1][0].float()
            cos = F.cosine_similarity(f[grid_pos], f[t][None], dim=-1)
            total = cos if total is None else total + cos
        per_token.append(total / len(blocks))
    if pool == "first":
        return per_token[0].cpu()
    if pool == "last":
        return per_token[-1].cpu()
    return (sum(per_token[1:], per_token[0]) / len(per_token)).cpu()


def attention_mask(attentions: Sequence[torch.Tensor], s1: list[int], grid_pos: list[int],
                   blocks: list[int], params: Mapping[str, Any], grid: tuple[int, int]
                   ) -> torch.Tensor | None:
    """M_A = 1[A_v > mean(A_v)], A_v the mean of the K candidate maps of lowest spatial entropy;
    a map is one (block, head)'s attention from the S1 tokens to the image grid (softmax over
    all keys), averaged over the S1 queries. Candidates: every block or l_s..l_e; the head guard
    (docs/fseg.md, Kang et al.): no more than ``sink_row`` mass on the last grid row, not in the
    first ``skip_layers`` blocks, image mass at least the elbow of all maps' masses (``chord``).
    None when no candidate is left."""
    pool = range(len(attentions)) if params["attn_layers"] == "all" else blocks
    maps, block_of = [], []
    for b in pool:
        a = attentions[b][0].float()                                  # heads x T x T
        for head in range(a.shape[0]):
            maps.append(a[head][s1][:, grid_pos].mean(0).cpu())
            block_of.append(b)
    mass = [float(m.double().sum()) for m in maps]
    cut = elbow(mass) if params["image_mass"] == "chord" else -math.inf
    cands = [i for i, m in enumerate(maps)
             if float(m.reshape(grid)[-1].sum()) <= float(params["sink_row"])
             and block_of[i] >= int(params["skip_layers"]) and mass[i] >= cut]
    if not cands:
        return None
    ent = {i: spatial_entropy(maps[i].reshape(grid).double().numpy(), params["entropy"])
           for i in cands}
    chosen = sorted(cands, key=lambda i: (ent[i], i))[:max(1, int(params["K"]))]
    a_v = torch.stack([maps[i] for i in chosen]).mean(0)
    return (a_v > a_v.mean()).float()


def elbow(values: list[float]) -> float:
    """The value, among ``values`` sorted ascending as points (i, v_i), farthest from the chord
    through the first and the last point (the smallest for two values or fewer)."""
    v = sorted(values)
    if len(v) <= 2:
        return v[0]
    n = len(v) - 1
    best, at = -1.0, 0
    for i, vi in enumerate(v):
        d = abs(n * (vi - v[0]) - (v[-1] - v[0]) * i) / math.hypot(n, v[-1] - v[0])
        if d > best:
            best, at = d, i
    return v[at]


def spatial_entropy(a: np.ndarray, variant: str) -> float:
    """H = -sum_n P(C_n) log P(C_n) over the 8-connected components C_n of B > 0
    (``area_mean``: B = ReLU(A - mean A), P = area share) or of B > 1e-3 max B
    (``mass_2mean``: B = ReLU(A - 2 mean A), P = mass share); +inf without a component."""
    k = 1.0 if variant == "area_mean" else 2.0
    b = np.maximum(a - k * a.mean(), 0.0)
    if variant == "area_mean":
        support = b > 0
    else:
        support = b > 1e-3 * b.max() if b.max() > 0 else np.zeros(b.shape, bool)
    labels, n = ndimage.label(support, structure=EIGHT)
    if n == 0:
        return math.inf
    sizes = [float((labels == i).sum()) if variant == "area_mean" else float(b[labels == i].sum())
             for i in range(1, n + 1)]
    p = [x / sum(sizes) for x in sizes if x > 0]
    return -sum(pi * math.log(pi) for pi in p)


# --- VGM + SAM ------------------------------------------------------------------------------------
def to_image(maps: torch.Tensor, view: tuple[int, int, int, int], size: tuple[int, int],
             mode: str) -> torch.Tensor:
    """C x gh x gw -> C x H x W: resized to the view box (the image region the grid covers, pad
    included), then each image pixel (y, x) reads box pixel (y - y0, x - x0); 0 outside."""
    y0, x0, bh, bw = view
    kw = {"align_corners": False} if mode == "bilinear" else {}
    box = F.interpolate(maps[None].float(), size=(bh, bw), mode=mode, **kw)[0]
    ys, xs = np.arange(size[0]) - y0, np.arange(size[1]) - x0
    out = torch.zeros(maps.shape[0], *size)
    iy, ix = np.nonzero((ys[:, None] >= 0) & (ys[:, None] < bh) & (xs >= 0) & (xs < bw))
    out[:, iy, ix] = box[:, ys[iy], xs[ix]]
    return out


def vgm_and_sam(predictor: Any, d_f: torch.Tensor, d_tilde: torch.Tensor, fv: torch.Tensor,
                labels: list[int], background: bool, size: tuple[int, int],
                grid: tuple[int, int], view: tuple[int, int, int, int],
                params: Mapping[str, Any]) -> np.ndarray:
    """D_f (Y x N), D~ (Y x N), F_v (N x Dv) -> M^_f, p+/p-, M_v, M_r, prompts, SAM, one map."""
    h, w = size
    gh, gw = grid
    alpha, beta = float(params["alpha"]), float(params["beta"])
    bg = min(alpha * float(d_f.max()), beta)                 # D_f^bg = min(alpha max D_f, beta)
    planes = torch.cat([torch.full((1, gh * gw), bg), d_f]).reshape(-1, gh, gw)
    guide = np.argmax(planes.reshape(len(planes), -1).numpy(), 0)     # M^_f: 0 = bg, j + 1
    planes_img = to_image(planes, view, size, "bilinear")
    guide_img = np.argmax(planes_img.numpy(), 0)
    th, tw = view[2] / gh, view[3] / gw                      # one token, in image pixels
    kernel = int(round(float(params["kernel_tokens"]) * min(th, tw)))
    min_px = float(params["min_area_tokens"]) * th * tw / (h * w) * (h * w)
    masks, ranks, mask_labels = [], [], []
    for j, label in enumerate(labels):
        inside = torch.from_numpy(guide == j + 1)
        if not inside.any():
            continue
        p_pos = fv[inside].mean(0)                           # p_c^+ and p_c^-
        p_neg = fv[~inside].mean(0) if (~inside).any() else None
        if p_neg is None or params["refine"] == "guidance":  # M_r = M^_f alone (ablation)
            m_v = torch.ones(gh * gw, dtype=torch.bool)
        else:                                                # M_v = 1[cos(F_v,p+) > cos(F_v,p-)]
            m_v = (F.cosine_similarity(fv, p_pos[None], dim=-1)
                   > F.cosine_similarity(fv, p_neg[None], dim=-1))
        if params["upsample"] == "bilinear_then_argmax":     # M_r = M_v . M^_f at image size
            m_v_img = to_image(m_v.float().reshape(1, gh, gw), view, size, "nearest")[0] > 0.5
            m_r = m_v_img.numpy() & (guide_img == j + 1)
        else:                                                # on the grid, then nearest
            m_r_grid = (m_v & inside).float().reshape(1, gh, gw)
            m_r = (to_image(m_r_grid, view, size, "nearest")[0] > 0.5).numpy()
        prompts = point_and_box_prompts(m_r, kernel, params, min_px)
        if prompts is None:
            continue
        points, box = prompts
        use_points = params["prompt"] in ("points", "both")
        use_box = params["prompt"] in ("box", "both")
        out, scores, _ = predictor.predict(
            point_coords=points if use_points else None,
            point_labels=np.ones(len(points), dtype=np.int64) if use_points else None,
            box=box if use_box else None, multimask_output=bool(params["multimask"]))
        best = int(np.argmax(scores)) if params["multimask"] else 0
        mask = out[best].astype(bool)
        masks.append(mask)
        mask_labels.append(label)
        ranks.append(merge_rank(params["merge"], mask, float(scores[best]), label,
                                planes_img[j + 1]))
    if background:
        result = np.zeros((h, w), dtype=np.int64)
    else:                # no background class: a pixel no mask covers takes the yes-class of top D~
        dt_img = to_image(d_tilde.reshape(-1, gh, gw), view, size, "bilinear").numpy()
        result = np.asarray(labels, dtype=np.int64)[np.argmax(dt_img, 0)]
    best_rank = np.full((h, w), -np.inf)
    covered = np.zeros((h, w), dtype=bool)
    for mask, rank, label in zip(masks, ranks, mask_labels):  # overlaps: highest rank, then first
        win = mask & (~covered | (rank > best_rank))
        result[win], best_rank[win], covered[win] = label, rank, True
    return result


def merge_rank(rule: str, mask: np.ndarray, score: float, label: int,
               plane: torch.Tensor) -> float:
    """activation: mean upsampled D_f^c inside the mask (-inf for an empty mask); score: SAM's
    predicted IoU; area_asc: smaller wins; order: lower label wins."""
    if rule == "activation":
        return float(plane.numpy()[mask].mean()) if mask.any() else -math.inf
    if rule == "score":
        return score
    if rule == "area_asc":
        return -float(mask.sum())
    return -float(label)


def window_op(mask: np.ndarray, k: int, erode: bool) -> np.ndarray:
    """Erosion (all) or dilation (any) over the k x k window at offsets -k//2 .. k - k//2 - 1
    around each pixel, pixels outside the image not counted."""
    h, w = mask.shape
    r = k // 2
    out = np.full(mask.shape, erode)
    for dy in range(-r, k - r):
        for dx in range(-r, k - r):
            shifted = np.full(mask.shape, erode)
            ys, yd = slice(max(0, dy), h + min(0, dy)), slice(max(0, -dy), h - max(0, dy))
            xs, xd = slice(max(0, dx), w + min(0, dx)), slice(max(0, -dx), w - max(0, dx))
            shifted[yd, xd] = mask[ys, xs]
            out = (out & shifted) if erode else (out | shifted)
    return out


def point_and_box_prompts(m_r: np.ndarray, kernel: int, params: Mapping[str, Any],
                          min_px: float) -> tuple[np.ndarray, np.ndarray] | None:
    """Morphological de-noising of M_r (opening then closing, or the reverse, with a kernel x
    kernel square; none below 2 px), 8-connected components of at least ``min_px`` pixels, the
    ``max_points`` largest (ties: the higher top row, the further-left column, the centroid's
    row then column), in that order; each centroid a positive point (x, y), moved onto the
    component's nearest pixel under ``snap_centroid`` when the pixel it rounds to is not in it;
    the box holds every kept component. With nothing left, ``empty: raw`` takes M_r's own
    components (no size limit), ``drop`` gives no prompt."""
    m = m_r.astype(bool)
    if kernel > 1:
        steps = [True, False, False, True] if params["morph"] == "open_close" else \
            [False, True, True, False]
        for erode in steps:
            m = window_op(m, kernel, erode)
    out = components(m, min_px, params)
    if out is None and params["empty"] == "raw" and m_r.any():
        out = components(m_r.astype(bool), 0.0, params)
    return out


def components(m: np.ndarray, min_px: float, params: Mapping[str, Any]
               ) -> tuple[np.ndarray, np.ndarray] | None:
    labels, n = ndimage.label(m, structure=EIGHT)
    found = []
    for i in range(1, n + 1):
        ys, xs = np.nonzero(labels == i)
        if len(ys) >= min_px:
            found.append(((-len(ys), ys.min(), xs.min(), ys.mean(), xs.mean()), ys, xs))
    found.sort(key=lambda c: c[0])
    found = found[:max(1, int(params["max_points"]))]
    if not found:
        return None
    points = []
    for _, ys, xs in found:
        cx, cy = xs.mean(), ys.mean()
        if params["snap_centroid"]:
            py = min(round(cy), m.shape[0] - 1)               # Python's round: halves to even
            px = min(round(cx), m.shape[1] - 1)
            if not any((ys == py) & (xs == px)):
                near = int(np.argmin((ys - cy) ** 2 + (xs - cx) ** 2))
                cx, cy = float(xs[near]), float(ys[near])
        points.append((cx, cy))
    all_y = np.concatenate([c[1] for c in found])
    all_x = np.concatenate([c[2] for c in found])
    box = np.array([all_x.min(), all_y.min(), all_x.max(), all_y.max()], dtype=np.float64)
    return np.array(points, dtype=np.float64), box
