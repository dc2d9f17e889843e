"""The search: tune a method's knobs with Ray Tune + Optuna and record every trial in MLflow.

One way through, top to bottom (``docs/architecture.md`` walks one search through it):

- entry points, the commands users call: ``run``, ``evaluate``, ``transfer``, ``export``,
  ``sync`` (parse, call, print) and ``mlflow_app`` (``mlflow server --app-name ovss``);
- :mod:`search.engine`: what a search does, phase by phase (plan, Ray session, extraction,
  tuning, re-ranking, holdout, outputs), and scoring a config;
- :mod:`search.record`: what it leaves behind (MLflow runs, the writer thread, the progress line,
  sync, the MLflow model, tables, the export);
- :mod:`search.core`: the vocabulary every layer shares (config, space, cache, preflight checks,
  one trial, the user's error inside a Ray failure);
- :mod:`search.data`: data set readers.

May import: a layer, only the layers below it, ``methods`` and ``rewards``; an entry point, no
other entry point. ``methods`` and ``rewards`` never import ``search``. Enforced by
``[tool.importlinter]`` in pyproject.toml and tests/test_architecture.py.
"""
