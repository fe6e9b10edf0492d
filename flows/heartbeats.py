"""The heartbeats of a stage's flow run, sent by gmpipe in place of Prefect's engine, so that a finished stage does not
wait for them.

While a flow runs, Prefect's engine sends a ``prefect.flow-run.heartbeat`` event every
``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` seconds (default 180); an automation that expects them marks a run whose
heartbeats stopped as Crashed (Prefect's detection of runs whose process died without saying so). The engine's thread
sleeps in one-second steps and is joined when the flow function returns, so every stage waited up to a second (half
on average) after its work was done. :func:`flow_run_heartbeats` sends the same event, for the same resources, at the
same frequency, from a thread that waits on an event and so stops at once; the engine's own heartbeats are switched
off for the run it wraps, and a user who switched heartbeats off gets none.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Iterator

HEARTBEAT_EVENT = "prefect.flow-run.heartbeat"
# How long the end of a run waits for a heartbeat being handed to Prefect's event queue (a moment) before moving on.
JOIN_SECONDS = 5.0


def heartbeat_resources(flow_run, flow_name: str) -> tuple[dict[str, str], list[dict[str, str]]]:
    """The event's resource (the flow run) and related resources (its flow, its deployment if any, its tags), as
    Prefect's engine names them, so that automations written for its heartbeats match these."""
    import prefect

    resource = {"prefect.resource.id": f"prefect.flow-run.{flow_run.id}",
                "prefect.resource.name": flow_run.name or "", "prefect.version": prefect.__version__}
    related = [{"prefect.resource.id": f"prefect.flow.{flow_run.flow_id}", "prefect.resource.role": "flow",
                "prefect.resource.name": flow_name}]
    if flow_run.deployment_id:
        related.append({"prefect.resource.id": f"prefect.deployment.{flow_run.deployment_id}",
                        "prefect.resource.role": "deployment"})
    related += [{"prefect.resource.id": f"prefect.tag.{tag}", "prefect.resource.role": "tag"}
                for tag in sorted(set(flow_run.tags or []))]
    return resource, related


@contextlib.contextmanager
def flow_run_heartbeats(flow_run, flow_name: str) -> Iterator[None]:
    """Send ``flow_run``'s heartbeats while the block runs (the first at once), with the engine's switched off; on
    exit the thread stops without waiting out an interval. With heartbeats switched off in Prefect's settings
    (``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` unset to none), nothing is sent."""
    from prefect.context import SettingsContext, get_settings_context
    from prefect.events import emit_event
    from prefect.logging import get_logger

    current = get_settings_context()
    seconds = current.settings.flows.heartbeat_frequency
    if seconds is None:
        yield
        return
    resource, related = heartbeat_resources(flow_run, flow_name)
    stop = threading.Event()
    logger = get_logger("gmpipe.heartbeats")

    def beat() -> None:
        while True:
            try:
                emit_event(event=HEARTBEAT_EVENT, resource=resource, related=related)
            except Exception:  # a lost heartbeat must not stop the stage; the next one may get through
                logger.debug("could not send a heartbeat of flow run %s", flow_run.id, exc_info=True)
            if stop.wait(seconds):
                return

    # The thread reports to the API this context names (a thread starts with an empty context otherwise).
    thread = threading.Thread(target=contextvars.copy_context().run, args=(beat,), daemon=True,
                              name=f"heartbeats of flow run {flow_run.id}")
    # A copy with one value changed: validating a whole new Settings (temporary_settings) costs 35 ms and more.
    settings = current.settings
    without = settings.model_copy(update={"flows": settings.flows.model_copy(update={"heartbeat_frequency": None})})
    with SettingsContext(profile=current.profile, settings=without):
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(JOIN_SECONDS)
