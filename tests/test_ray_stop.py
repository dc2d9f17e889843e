"""The Ray a search started is stopped in the background as soon as nothing needs it: right
after the overlays when the driver decodes them (clipseg's decode head) and nothing is held out,
and only after the held-out images are scored otherwise."""

from __future__ import annotations

import pytest

import search.holdout as holdout
import search.model as model
import search.orchestrate as orch
import search.tune as tune
from search.run import main as run_main


def _events(monkeypatch) -> list[str]:
    import ray

    events: list[str] = []

    def wrap(module, name):
        real = getattr(module, name)

        def call(*a, **k):
            events.append(name)
            return real(*a, **k)

        monkeypatch.setattr(module, name, call)

    wrap(tune, "_plots")
    wrap(holdout, "score_holdout")
    wrap(model, "log_tuned_model")
    # As if this search had started Ray (the tests share one session Ray, which stays up).
    monkeypatch.setattr(orch, "_init_ray", lambda address: True)
    monkeypatch.setattr(ray, "shutdown", lambda *a, **k: events.append("ray.shutdown"))
    return events


@pytest.mark.parametrize("holdout_n, before", [(0, "_plots"), (2, "log_tuned_model")])
def test_ray_stops_once_nothing_needs_it(ray_session, workdir, monkeypatch, capsys, holdout_n,
                                         before):
    events = _events(monkeypatch)
    argv = ["--method", "clipseg", "--preset", "smoke", "--num-samples", "1", "--rungs", "1"]
    if holdout_n:
        argv += ["--holdout", str(holdout_n)]
    assert run_main(argv) == 0, capsys.readouterr().err[-2000:]
    assert events.count("ray.shutdown") == 1
    stop = events.index("ray.shutdown")
    assert stop < events.index(before)
    if holdout_n:   # the held-out images were scored with Ray up
        assert events.index("score_holdout") < stop
