"""``mlflow server --app-name ovss``: MLflow's own tracking server, whose UI opens an experiment
on its runs table instead of the GenAI overview.

Why an app: the MLflow 3.17 UI always runs its workflow-based navigation (the feature flag is a
constant ``true`` in ``mlflow/server/js/build/static/js/main.c2f5f8d4.js``, webpack module
89511, export ``Z0``). With it on, the experiment's kind comes from the UI's workflow switch: the
``workflowType`` URL parameter, else the browser's stored choice (localStorage key
``mlflow.workflowType_v1``, a JSON string), else ``genai`` (module 7975 of the same file); the
experiment tag ``mlflow.experimentKind`` that :mod:`search.record.tracking` sets is read only when
the flag is off (module 31080). The experiment page then redirects to the GenAI overview for
``genai`` and to the runs table for ``machine_learning`` (``experimentPage.20d52159.chunk.js``).
Nothing a client writes into the store changes that, so this app adds to the UI's single page
(``index.html``) a script that stores ``machine_learning`` under that key when the browser has no
choice stored yet. The user's own switch (and any ``workflowType`` in a link) still wins.

``infra/mlflow-server.sh`` starts the server with this app (the entry point ``ovss`` of the
``mlflow.app`` group in ``pyproject.toml``) unless ``MLFLOW_AUTH=1`` asks for MLflow's
``basic-auth`` app; a server run elsewhere still opens the runs table from the links the search
prints, which carry ``?workflowType=machine_learning``.
"""

from __future__ import annotations

#: Where the MLflow 3 UI keeps the workflow switch's choice (``<key>_v<version>``, JSON value).
WORKFLOW_KEY = "mlflow.workflowType_v1"
DEFAULT = "machine_learning"
SCRIPT = ('<script>try{if(localStorage.getItem("' + WORKFLOW_KEY + '")===null){'
          'localStorage.setItem("' + WORKFLOW_KEY + '",JSON.stringify("' + DEFAULT + '"))}}'
          'catch(e){}</script>')


def inject(html: str) -> str:
    """``html`` with :data:`SCRIPT` first in its ``<head>`` (it must run before the UI's own
    deferred bundle reads the key); unchanged when already there or when there is no head."""
    if SCRIPT in html or "<head>" not in html:
        return html
    return html.replace("<head>", "<head>" + SCRIPT, 1)


def add_runs_table_default(app):
    """Register the injection on MLflow's Flask ``app`` (the UI page only: endpoint ``serve``,
    a 200 HTML answer); every API and static answer passes untouched."""
    from flask import request

    @app.after_request
    def _runs_table_default(response):
        if (request.endpoint != "serve" or response.status_code != 200
                or response.mimetype != "text/html"):
            return response
        response.direct_passthrough = False
        html = response.get_data(as_text=True)
        page = inject(html)
        if page != html:
            response.set_data(page)
            tag, _weak = response.get_etag()
            if tag:   # not the file's own tag: a browser's copy of the plain page is not reused
                response.set_etag(f"{tag}-ovss")
        return response

    return app


def create_app():
    """The app factory ``mlflow server --app-name ovss`` runs: MLflow's Flask app with the
    injection, wrapped in MLflow's FastAPI app when the server runs uvicorn (its default)."""
    from mlflow.environment_variables import _MLFLOW_SGI_NAME
    from mlflow.server import app

    add_runs_table_default(app)
    if _MLFLOW_SGI_NAME.get() == "uvicorn":
        from mlflow.server.fastapi_app import create_fastapi_app

        return create_fastapi_app(app)
    return app
