"""A stage's flow run sends Prefect's heartbeat events from gmpipe's own thread: the events an automation watching for
crashed runs expects reach the server, and the run ends without waiting out a heartbeat interval."""

from __future__ import annotations

import threading
import time

import yaml

from tests.conftest import smoke_params


def _heartbeat_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith("heartbeats of flow run")]


def _heartbeats_of(flow_run_id, timeout: float = 30.0) -> list[dict]:
    """The heartbeat events of a flow run on the test server (events are written a moment after they arrive)."""
    from prefect.client.orchestration import get_client

    query = {"filter": {"event": {"name": ["prefect.flow-run.heartbeat"]},
                        "resource": {"id": [f"prefect.flow-run.{flow_run_id}"]}}, "limit": 50}
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            events = client.request("POST", "/events/filter", json=query).json()["events"]
            if events or time.monotonic() > deadline:
                return events
            time.sleep(0.5)


def _a_flow_run():
    from prefect import flow
    from prefect.client.orchestration import get_client

    @flow(name="heartbeat-probe")
    def probe():
        return None

    with get_client(sync_client=True) as client:
        return client.create_flow_run(probe, tags=["probe"]), probe.name


def test_a_stage_run_sends_heartbeats_naming_its_run_and_flow(prefect_api, tmp_path):
    from flows.stages import run_stage

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(smoke_params(prepare={"max_per_class": 2})))
    state = run_stage("prepare", "params.yaml", str(tmp_path))
    assert state.is_completed(), state.message
    assert not _heartbeat_threads()

    [event] = _heartbeats_of(state.state_details.flow_run_id)
    assert event["resource"]["prefect.resource.name"]
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        flow_id = client.read_flow_run(state.state_details.flow_run_id).flow_id
    related = {item["prefect.resource.role"]: item for item in event["related"]}
    # The flow by its id (what an automation matches on); the server may fill in names from its own records.
    assert related["flow"]["prefect.resource.id"] == f"prefect.flow.{flow_id}"


def test_heartbeats_switch_the_engines_off_and_stop_at_once(prefect_api):
    from prefect.settings import get_current_settings

    from flows.heartbeats import flow_run_heartbeats

    flow_run, name = _a_flow_run()
    assert get_current_settings().flows.heartbeat_frequency == 180  # Prefect's default: 3 minutes between beats
    with flow_run_heartbeats(flow_run, name):
        assert get_current_settings().flows.heartbeat_frequency is None  # the engine sends none of its own
        [thread] = _heartbeat_threads()
        time.sleep(0.2)  # the first beat is out; the thread now waits for the next
        leaving = time.perf_counter()
    left_after = time.perf_counter() - leaving
    assert not thread.is_alive() and left_after < 0.5, left_after
    assert get_current_settings().flows.heartbeat_frequency == 180

    [event] = _heartbeats_of(flow_run.id)
    roles = sorted((item["prefect.resource.role"], item["prefect.resource.id"]) for item in event["related"])
    assert {("flow", f"prefect.flow.{flow_run.flow_id}"), ("tag", "prefect.tag.probe")} <= set(roles), roles


def test_no_heartbeats_when_the_user_switched_them_off(prefect_api):
    from prefect.settings import temporary_settings

    from flows.heartbeats import flow_run_heartbeats

    flow_run, name = _a_flow_run()
    with temporary_settings(updates={"flows.heartbeat_frequency": None}):
        with flow_run_heartbeats(flow_run, name):
            assert not _heartbeat_threads()
    assert _heartbeats_of(flow_run.id, timeout=3.0) == []
