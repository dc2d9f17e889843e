"""The user's error inside a Ray failure: a trial, an extraction or a scoring task raised an
:class:`OvssError` (a corrupt image, a missing checkpoint), and Ray wrapped it."""

from __future__ import annotations

from methods.base import OvssError


def user_error(e: BaseException) -> OvssError | None:
    """The OvssError inside a Ray task / trial error, if there is one."""
    seen = 0
    while isinstance(e, BaseException) and seen < 10:
        # RayTaskError.cause is the task's exception; RayActorError's may be a protobuf
        # context or text (OOM kills, dead workers): follow exceptions only.
        try:
            cause = getattr(e, "cause", None)
        except Exception:  # a Ray dual exception's __getattr__ without its cause: recursion
            cause = None
        # RayTaskError(OvssError) is an OvssError too, but its text is the remote traceback.
        if isinstance(e, OvssError) and not isinstance(cause, OvssError):
            return e
        e = cause if isinstance(cause, BaseException) else e.__cause__
        seen += 1
    return None
