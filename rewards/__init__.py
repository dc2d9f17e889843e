"""Scores of a label map: dense-label mIoU (``rewards.miou``) and the label-free CLIP contrastive
reward (``rewards.clip_contrastive``). No Ray, Optuna or MLflow here.

Both follow one accumulator shape so that the search treats them alike::

    acc = scorer.new()                      # one per trial and rung
    acc.update(image, pred, label=..., present=...)
    acc.value()                             # float, higher is better
    acc.details()                           # dict[str, float] for logging (per-class IoU, ...)
"""
