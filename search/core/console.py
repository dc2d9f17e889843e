"""What a user reads: scores in one unit, next-step commands that run as printed, and the
libraries' own chatter kept behind ``--verbose``.

**One unit.** Every score printed for a user is in percent, with its name, as mmsegmentation
prints mIoU: ``mIoU 5.46 %``, ``CLIP reward 43.75 %`` (the share of (image, class) pairs whose
masked image the reward's CLIP prefers to the black image). MLflow metrics and CSV tables hold
fractions in [0, 1]; Markdown tables say ``(%)`` in their header (:mod:`search.record.tables`).

**Commands that run.** A next step is printed with the interpreter that ran this search
(``sys.executable``) and the ``mlflow`` beside it, so it runs when pasted into a fresh shell
without the virtual environment active, each command alone on its line.

**Quiet libraries.** A local run shows our progress line and our summary. Without ``--verbose``
these are off: Ray's token-authentication notice for a cluster the search started itself, Ray
Tune's configuration box and "View detailed results here" (Tune's new console output, whose
``verbose=0`` still prints them; its legacy output at ``verbose=0`` prints nothing), Optuna's
"A new study created in memory" (INFO), MLflow's INFO lines (database set-up) and its artifact
download bars. Their warnings and errors still show.
"""

from __future__ import annotations

import logging
import math
import os
import shlex
import sys
from pathlib import Path

#: Printed names of the scores (keys: a reward's name or its metric name).
SCORE_NAMES = {"miou": "mIoU", "clip": "CLIP reward", "clip_score": "CLIP reward"}

#: Loggers whose INFO lines are library chatter (their warnings still show).
CHATTY_LOGGERS = ("mlflow", "alembic", "optuna")
#: Ray's notice that a local cluster it starts has token authentication on (a WARNING record that
#: says nothing a user of a cluster the search started itself must act on).
RAY_TOKEN_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"
#: Environment read by the libraries when they print (set only where the user has not).
QUIET_ENV = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "MLFLOW_LOGGING_LEVEL": "WARNING"}
#: Environment of Tune's ``fit()`` for its quiet legacy console output (see the module docstring).
QUIET_TUNE_ENV = {"RAY_AIR_NEW_OUTPUT": "0"}


def score_name(metric: str) -> str:
    """``miou`` -> ``mIoU``, ``clip``/``clip_score`` -> ``CLIP reward``; others as they are."""
    return SCORE_NAMES.get(metric, metric)


def percent(value: float | None, digits: int = 2) -> str:
    """A fraction as ``12.34 %``; ``n/a`` for None or a non-finite value."""
    if value is None or not math.isfinite(float(value)):
        return "n/a"
    return f"{100 * float(value):.{digits}f} %"


def score_text(metric: str, value: float | None) -> str:
    """``mIoU 5.46 %``: a score as a user reads it (module docstring)."""
    return f"{score_name(metric)} {percent(value)}"


def python_command(*args: str) -> str:
    """``<this interpreter> ARGS...``, shell-quoted: runs in a fresh shell as printed."""
    return shlex.join([sys.executable, *map(str, args)])


def mlflow_command(*args: str) -> str:
    """The ``mlflow`` command beside this interpreter (its virtual environment's), else
    ``<this interpreter> -m mlflow``; shell-quoted."""
    exe = Path(sys.executable).with_name("mlflow")
    head = [str(exe)] if exe.is_file() and os.access(exe, os.X_OK) else [sys.executable, "-m",
                                                                          "mlflow"]
    return shlex.join([*head, *map(str, args)])


#: MLflow 3's server starts a job runner (huey consumers for its GenAI jobs: scorers, trace
#: rollups) beside the app; an ovss-tune record uses none of it, and the runner costs ~20 CPU-s
#: and 8 more processes at each start (26.1 vs 5.7 CPU-s from the start to 8 s after /health
#: answers, /health after 7.9 vs 5.7 s, 2-core machine: `python bench/mlflow_server.py`).
#: The servers and UIs that ovss-tune starts or prints go without it.
MLFLOW_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def mlflow_server_command(*args: str) -> str:
    """:func:`mlflow_command` for ``mlflow ui`` / ``mlflow server``, run through ``env`` with
    :data:`MLFLOW_SERVER_ENV` (where the user set one of its variables, their value)."""
    env = [f"{k}={os.environ.get(k, v)}" for k, v in MLFLOW_SERVER_ENV.items()]
    return shlex.join(["env", *env]) + " " + mlflow_command(*args)


def quiet_libraries(verbose: bool = False) -> None:
    """Keep the libraries' chatter off for the rest of this process unless ``verbose``
    (module docstring). Warnings and errors of every library still show."""
    if verbose:
        return
    import optuna  # its import sets its logger to INFO: quieten it after

    for k, v in QUIET_ENV.items():   # MLflow reads its level when it is imported
        os.environ.setdefault(k, v)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger(RAY_TOKEN_NOTICE_LOGGER).setLevel(logging.ERROR)


def tune_env(verbose: bool = False) -> dict[str, str]:
    """Environment for Tune's ``fit()``: its quiet console output unless ``verbose``."""
    return {} if verbose else dict(QUIET_TUNE_ENV)

