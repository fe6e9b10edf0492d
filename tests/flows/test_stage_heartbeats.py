"""A stage's flow run sends Prefect's heartbeat events from gmpipe's own thread: the events an automation watching for
crashed runs expects reach the server naming the stage's run and flow exactly as Prefect's own heartbeats would, also
after another flow run in the same process, and the run ends without waiting out a heartbeat interval."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time

import yaml

from tests.conftest import REPO, smoke_params


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


def _expected_names(flow_run_id) -> tuple[dict, list[dict]]:
    """What Prefect's engine names in a heartbeat of this flow run (no deployment, no tags): the run, and its flow."""
    import prefect
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
        flow = client.read_flow(flow_run.flow_id)
    resource = {"prefect.resource.id": f"prefect.flow-run.{flow_run.id}", "prefect.resource.name": flow_run.name,
                "prefect.version": prefect.__version__}
    return resource, [{"prefect.resource.id": f"prefect.flow.{flow.id}", "prefect.resource.role": "flow",
                       "prefect.resource.name": flow.name}]


def test_a_stage_run_sends_heartbeats_naming_its_run_and_flow(prefect_api, tmp_path):
    from flows.stages import run_stage

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(smoke_params(prepare={"max_per_class": 2})))
    state = run_stage("prepare", "params.yaml", str(tmp_path))
    assert state.is_completed(), state.message
    assert not _heartbeat_threads()

    [event] = _heartbeats_of(state.state_details.flow_run_id)  # one: gmpipe's, none from the engine
    resource, related = _expected_names(state.state_details.flow_run_id)
    assert (event["resource"], event["related"]) == (resource, related)
    assert related[0]["prefect.resource.name"] == "prepare"


def test_after_another_flow_run_the_heartbeats_name_the_stages_run_only(prefect_api, tmp_path):
    """A fresh process whose first event is another flow run's heartbeat (that run's context then stays with
    Prefect's events worker, which fills in what an event's sender did not set): gmpipe's heartbeat of the stage run
    that follows names that run and its flow and nothing else, exactly as the engine's own heartbeat of the same stage
    flow does."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(smoke_params(prepare={"max_per_class": 2})))
    script = textwrap.dedent(f"""
        import json
        from prefect import flow
        from flows.stages import run_stage, stage_flow

        @flow(name="heartbeat-probe")
        def probe():
            return None

        probe()  # the engine's heartbeat of this run is the process's first event
        gmpipes = run_stage("prepare", "params.yaml", {str(tmp_path)!r})
        engines = stage_flow("prepare")("params.yaml", {str(tmp_path)!r}, return_state=True)
        print(json.dumps([str(gmpipes.state_details.flow_run_id), str(engines.state_details.flow_run_id)]))
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    gmpipes_run, engines_run = json.loads(done.stdout.strip().splitlines()[-1])

    [gmpipes] = _heartbeats_of(gmpipes_run)
    [engines] = _heartbeats_of(engines_run)
    assert (gmpipes["resource"], gmpipes["related"]) == _expected_names(gmpipes_run)
    assert (engines["resource"], engines["related"]) == _expected_names(engines_run)
    assert gmpipes["related"] == engines["related"]  # the same flow, named the same way


def test_heartbeats_switch_the_engines_off_and_stop_at_once(prefect_api):
    from prefect import flow
    from prefect.settings import get_current_settings

    from flows.heartbeats import engine_heartbeats_off, flow_run_heartbeats

    assert get_current_settings().flows.heartbeat_frequency == 180  # Prefect's default: 3 minutes between beats
    seen = {}

    @flow(name="heartbeat-probe")
    def probe():
        seen["frequency"] = get_current_settings().flows.heartbeat_frequency  # the engine sends none of its own
        with flow_run_heartbeats():
            [seen["thread"]] = _heartbeat_threads()
            time.sleep(0.2)  # the first beat is out; the thread now waits for the next
            seen["leaving"] = time.perf_counter()
        seen["left_after"] = time.perf_counter() - seen["leaving"]

    with engine_heartbeats_off():
        state = probe(return_state=True)
    assert state.is_completed()
    assert seen["frequency"] is None
    assert not seen["thread"].is_alive() and seen["left_after"] < 0.5, seen["left_after"]
    assert get_current_settings().flows.heartbeat_frequency == 180
    [event] = _heartbeats_of(state.state_details.flow_run_id)
    assert (event["resource"], event["related"]) == _expected_names(state.state_details.flow_run_id)


def test_no_heartbeats_when_the_user_switched_them_off_nor_outside_a_flow_run(prefect_api):
    from prefect import flow
    from prefect.settings import temporary_settings

    from flows.heartbeats import engine_heartbeats_off, flow_run_heartbeats

    @flow(name="heartbeat-probe")
    def probe():
        with flow_run_heartbeats():
            return _heartbeat_threads()

    with temporary_settings(updates={"flows.heartbeat_frequency": None}):
        with engine_heartbeats_off():
            state = probe(return_state=True)
    assert state.result() == []
    assert _heartbeats_of(state.state_details.flow_run_id, timeout=3.0) == []
    with engine_heartbeats_off(), flow_run_heartbeats():  # no flow run to send heartbeats for
        assert not _heartbeat_threads()
