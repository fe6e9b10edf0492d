"""Which Prefect API a gmpipe process reports to, decided once, before any flow runs.

What the user configured wins, as Prefect itself resolves it: ``PREFECT_API_URL`` in the environment, the active
profile (``prefect config set PREFECT_API_URL=...``, ``prefect cloud login``), ``prefect.toml``. Only when none of
them names an API does gmpipe fall back to a private Prefect home inside the project (``.prefect/``, unless
``PREFECT_HOME`` is set) holding the database of the server it starts, with a startup timeout long enough for two
slow cores and no analytics. DVC sends no analytics either way.

Prefect reads its settings when it is first imported; the fallback therefore sets the environment (which every
child process, ``dvc`` and the stages it runs, inherits) and then refreshes Prefect's settings in this process.
"""

from __future__ import annotations

import os
from pathlib import Path

PRIVATE_HOME = ".prefect"
# Set by the pipeline for the one ``dvc repro`` it runs: a JSON mapping of stage name to the id of the pipeline's task
# run for that stage, so that the stage flow dvc starts becomes a child of its own stage's task run.
PARENT_TASK_RUNS = "GMPIPE_PREFECT_PARENT_TASK_RUNS"


def configure(root: str | Path = ".", refresh: bool = True) -> str | None:
    """The API URL the user configured, or None after switching this process and its children to gmpipe's private
    home under ``root`` (a flow then runs on Prefect's temporary server unless :func:`use_api` names a server gmpipe
    started: the pipeline's own, or the project's shared one, :mod:`flows.project_server`). ``refresh=False`` leaves
    Prefect's settings in this process to the :func:`use_api` that the caller makes next (each reading of them costs
    about 0.1 s)."""
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    from prefect.settings import get_current_settings

    configured = get_current_settings().api.url
    if configured:
        return configured
    _update_environment({
        "PREFECT_HOME": os.environ.get("PREFECT_HOME") or str(Path(root).resolve() / PRIVATE_HOME),
        "PREFECT_SERVER_EPHEMERAL_ENABLED": "true",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }, refresh)
    return None


def private_home() -> Path:
    """gmpipe's private Prefect home, as :func:`configure` set it when no API was configured."""
    return Path(os.environ["PREFECT_HOME"])


def use_api(api_url: str) -> None:
    """Report to ``api_url`` (a server gmpipe started), here and in every child process."""
    _update_environment({"PREFECT_API_URL": api_url})


def where_configured() -> str:
    """Where the API URL in force came from, for messages: the environment or the active profile's name."""
    if os.environ.get("PREFECT_API_URL"):
        return "PREFECT_API_URL in the environment"
    from prefect.context import get_settings_context

    return f"the Prefect profile '{get_settings_context().profile.name}'"


def unreachable_reason() -> str | None:
    """None when the API in force answers its health check, else one line saying which API and why not."""
    from prefect.client.orchestration import get_client
    from prefect.settings import get_current_settings

    with get_client(sync_client=True) as client:
        error = client.api_healthcheck()
    if error is None:
        return None
    return (f"the Prefect API {get_current_settings().api.url} (from {where_configured()}) does not answer "
            f"({type(error).__name__}: {error}); start that server, or choose another API")


def _update_environment(values: dict[str, str], refresh: bool = True) -> None:
    os.environ.update(values)
    if refresh:
        from prefect.context import refresh_global_settings_context

        refresh_global_settings_context()
