"""Scores of a label map: dense-label mIoU (``rewards.miou``) and the label-free CLIP contrastive
reward (``rewards.clip_contrastive``); ``rewards.fidelity`` compares a label-free reward with
mIoU over trials.

May import: ``methods`` (``ClassSet``, the CLIP loader), torch, numpy, scipy, matplotlib. Never
``search``, ``bench`` or ``tests``, and never Ray, Optuna or MLflow.

Both follow one accumulator shape so that the search treats them alike::

    acc = scorer.new()                      # one per trial and rung
    acc.update(image, pred, label=..., present=...)
    acc.value()                             # float, higher is better
    acc.details()                           # dict[str, float] for logging (per-class IoU, ...)
"""
