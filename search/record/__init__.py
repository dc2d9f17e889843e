"""The record of a search: what it leaves behind for people to read.

``tracking`` (experiments, parent runs, batched metrics and params, the dataset input, UI links),
``trials`` (one MLflow child run per Tune trial, from a Tune callback) over ``writer`` (its store
calls on one thread, offline instead of failing), ``progress`` (the live progress line),
``sync`` (push what an outage kept from the store), ``model`` (the tuned config as an MLflow
model), ``export`` (the best config to conf/tuned/), ``tables`` (score tables as CSV and
Markdown).

May import: :mod:`search.core`, :mod:`search.data`, ``methods``, MLflow and Ray Tune's callback
API. Never :mod:`search.engine` or the entry points.
"""
