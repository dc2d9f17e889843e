"""The engine: what one search does, phase by phase, and scoring a config.

``search.py`` walks a search's phases in order (:func:`search.engine.search.run_search`):
``plan`` (validate everything before Ray) -> ``session`` (Ray) -> ``extract`` (fill the evidence
cache) -> ``tuning`` (Ray Tune + Optuna + ASHA) -> ``rerank`` (two-stage search) -> ``outputs``
(best config, plots, ``overlays``; description and model) -> ``holdout`` (score held-out images).
A cost-aware search (docs/cost.md) adds ``objectives`` (its flags, in the plan),
``warmstart``, ``probe`` (the cost of extract) and ``pareto`` (front, budget, stop reason,
importances). ``backbones`` drives one search per backbone. ``scoring`` scores one config on a
set of images (``configs`` loads tuned configs to score); ``evaluation`` and ``transfer`` do the
work of the commands of the same names.

May import: :mod:`search.record`, :mod:`search.core`, :mod:`search.data`, ``methods``,
``rewards``, Ray, Optuna, MLflow. Never the entry points. Inside, the order of
``[[tool.importlinter.contracts]]`` "engine phases" in pyproject.toml: a module imports only
modules listed below it.
"""
