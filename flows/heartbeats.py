"""The heartbeats of a stage's flow run, sent by gmpipe in place of Prefect's engine, so that a finished stage does not
wait for them.

While a flow runs, Prefect's engine sends a ``prefect.flow-run.heartbeat`` event every
``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` seconds (default 180, at least 30); an automation that expects them marks a run
whose heartbeats stopped as Crashed (Prefect's detection of runs whose process died without saying so). The engine's
thread sleeps in one-second steps and is joined when the flow function returns, so every stage waited up to a second
(half on average) after its work was done. gmpipe sends the same event, for the same resources, at the same frequency,
from a thread that waits on an event and so stops at once:

- :func:`engine_heartbeats_off` goes around the engine's run of the flow: it switches the engine's heartbeats off for
  that run and hands their frequency to the flow (none when the user switched heartbeats off);
- :func:`flow_run_heartbeats` goes around the flow function's body, inside the flow run, as the engine's own
  heartbeats do.

Where the thread starts matters. Prefect's events worker (one per process) adds to every event the related resources
of the flow run found in the context the event was sent from; a context variable the sender never set takes the value
it has in the worker's own context, which is the context of whatever sent the process's first event. A thread started
outside the flow run has no flow run in its context, so after an earlier flow run in the same process had started the
worker (a test session, any process running more than one flow) the heartbeats also named that run and its flow.
Started inside the flow run, the thread's context names the stage's own run, as the engine's thread's does.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Iterator

HEARTBEAT_EVENT = "prefect.flow-run.heartbeat"
# How long the end of a run waits for a heartbeat being handed to Prefect's event queue (a moment) before moving on.
JOIN_SECONDS = 5.0
# Seconds between heartbeats for the flow run that engine_heartbeats_off goes around; None: send none.
_SECONDS: contextvars.ContextVar[int | None] = contextvars.ContextVar("gmpipe_heartbeat_seconds", default=None)


def heartbeat_resources(flow_run, flow_name: str) -> tuple[dict[str, str], list[dict[str, str]]]:
    """The event's resource (the flow run) and related resources (its flow, its deployment if any, its tags), as
    Prefect's engine names them, so that automations written for its heartbeats match these."""
    import prefect

    resource = {"prefect.resource.id": f"prefect.flow-run.{flow_run.id}",
                "prefect.resource.name": flow_run.name or "", "prefect.version": prefect.__version__}
    related = []
    if flow_run.flow_id:
        related.append({"prefect.resource.id": f"prefect.flow.{flow_run.flow_id}", "prefect.resource.role": "flow",
                        "prefect.resource.name": flow_name})
    if flow_run.deployment_id:
        related.append({"prefect.resource.id": f"prefect.deployment.{flow_run.deployment_id}",
                        "prefect.resource.role": "deployment"})
    related += [{"prefect.resource.id": f"prefect.tag.{tag}", "prefect.resource.role": "tag"}
                for tag in sorted(set(flow_run.tags or []))]
    return resource, related


@contextlib.contextmanager
def engine_heartbeats_off() -> Iterator[None]:
    """Around the engine's run of a flow whose function sends its own heartbeats (:func:`flow_run_heartbeats`): the
    engine sends none for it, and the flow learns their frequency (at least the engine's minimum). With heartbeats
    switched off in Prefect's settings (``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` unset to none), nothing changes."""
    from prefect.context import SettingsContext, get_settings_context
    from prefect.flow_engine import MINIMUM_HEARTBEAT_INTERVAL

    current = get_settings_context()
    settings = current.settings
    seconds = settings.flows.heartbeat_frequency
    if seconds is None:
        yield
        return
    # A copy with one value changed: validating a whole new Settings (temporary_settings) costs 35 ms and more.
    without = settings.model_copy(update={"flows": settings.flows.model_copy(update={"heartbeat_frequency": None})})
    token = _SECONDS.set(max(seconds, MINIMUM_HEARTBEAT_INTERVAL))
    try:
        with SettingsContext(profile=current.profile, settings=without):
            yield
    finally:
        _SECONDS.reset(token)


@contextlib.contextmanager
def flow_run_heartbeats() -> Iterator[None]:
    """Inside a flow function: send the heartbeats of the flow run it runs in while the block runs (the first at
    once), when :func:`engine_heartbeats_off` switched the engine's off for it; on exit the thread stops without
    waiting out an interval. Anywhere else (the engine sends its own, or none are wanted) it does nothing."""
    from prefect.context import FlowRunContext

    seconds = _SECONDS.get()
    run_context = FlowRunContext.get()
    if seconds is None or run_context is None or run_context.flow_run is None:
        yield
        return
    from prefect.events import emit_event
    from prefect.logging import get_logger

    flow_run = run_context.flow_run
    resource, related = heartbeat_resources(flow_run, run_context.flow.name)
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

    # The thread's context is this one: the stage's flow run (see the module's docstring) and the API it reports to.
    thread = threading.Thread(target=contextvars.copy_context().run, args=(beat,), daemon=True,
                              name=f"heartbeats of flow run {flow_run.id}")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(JOIN_SECONDS)
        _wait_until_sent(JOIN_SECONDS)


def _wait_until_sent(seconds: float) -> None:
    """Wait (at most ``seconds``) until the process's events worker has sent every event queued so far, as Prefect's
    task runners do before they finish: a heartbeat sent as the run ends is delivered, and a stage that fails at once
    does not end its output with the worker's "Still processing items" warning at exit, after its one error line."""
    from prefect.events.worker import EventsWorker

    worker = EventsWorker.instance()
    waiter = threading.Thread(target=worker.wait_until_empty, daemon=True, name="gmpipe: events sent")
    waiter.start()
    waiter.join(seconds)
