"""The OvssError inside whatever Ray wraps it in (:func:`search.core.errors.user_error`): a task
error, its dual exception, a chained error; none in a dead actor, an OOM kill or a crashed
worker."""

from __future__ import annotations

import pytest

from methods.base import OvssError


def _ray_errors():
    import ray.exceptions as E
    from ray.core.generated.common_pb2 import ActorDiedErrorContext

    user = OvssError("cannot read image x.jpg: broken")
    context = ActorDiedErrorContext(error_message="killed by the memory monitor",
                                    actor_id=b"0" * 16)
    task = E.RayTaskError("_extract_task", "Traceback ...", user)

    class Dual(E.RayTaskError):  # a dual exception whose cause attribute went missing
        def __init__(self):
            pass

        def __getattr__(self, name):
            return getattr(self.cause, name)

    chained = RuntimeError("trial failed")
    chained.__cause__ = task
    return [
        ("task-error", task, user),
        ("task-error-dual", task.as_instanceof_cause(), user),
        ("chained", chained, user),
        ("task-error-context-cause", E.RayTaskError("f", "tb", context), None),
        ("actor-died", E.ActorDiedError(context), None),
        ("out-of-memory", E.OutOfMemoryError("Task was killed due to the node running low "
                                             "on memory"), None),
        ("worker-crashed", E.WorkerCrashedError(), None),
        ("dual-without-cause", Dual(), None),
        ("not-an-exception", "error text", None),
    ]


@pytest.mark.parametrize("i", range(9))
def test_user_error_unwraps_ray_errors(i):
    from search.core.errors import user_error

    name, err, want = _ray_errors()[i]
    got = user_error(err)
    if want is None:
        assert got is None, name
    else:
        assert isinstance(got, OvssError) and str(got) == str(want), name
