"""The foundations every layer of the search shares.

``config`` (a method spec narrowed to one search, ``--set``), ``space`` (search spaces as Optuna
distributions), ``cache`` (the content-addressed evidence cache and its keys), ``preflight``
(checks before Ray starts), ``trial`` (the picklable search context and one trial: evidence in,
params in, a score out), ``errors`` (the user's error inside a Ray failure), ``cost`` (seconds
per image: timing and its cache), ``front`` (objectives, Pareto front, budget, picks, patience).

May import: :mod:`search.data`, ``methods``, ``rewards``, Optuna, Ray (the preflight probes).
Never :mod:`search.engine`, :mod:`search.record` or the entry points.
"""
