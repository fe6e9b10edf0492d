"""Which machine this is (from the environment, never from params.yaml) and where the rendezvous listens.
The multi-process runs themselves: tests/stages/test_world_sizes.py and test_two_machines_on_loopback in
tests/stages/test_latent_stages.py."""

from __future__ import annotations

import socket

import pytest
import yaml

from gmpipe.cli import main
from gmpipe.config.params import parse_params
from gmpipe.errors import GmpipeError
from gmpipe.launch import accelerate_command, rendezvous_port
from gmpipe.rendezvous import MACHINE_RANK_VARIABLES, is_loopback, machine_rank
from tests.conftest import smoke_params


def test_machine_rank_comes_from_the_first_variable_set():
    assert MACHINE_RANK_VARIABLES[0] == "GMPIPE_MACHINE_RANK"
    everything = {name: str(i) for i, name in enumerate(MACHINE_RANK_VARIABLES)}  # 0, 1, 2, 3, 4
    for first in range(len(MACHINE_RANK_VARIABLES)):
        later = {name: value for name, value in everything.items() if int(value) >= first}
        assert machine_rank(8, later) == first
    assert machine_rank(2, {"SLURM_NODEID": "1", "GMPIPE_MACHINE_RANK": " "}) == 1  # blank counts as unset


def test_one_machine_is_rank_0_whatever_a_scheduler_says():
    assert machine_rank(1, {}) == 0
    assert machine_rank(1, {"SLURM_NODEID": "3", "JOB_COMPLETION_INDEX": "7"}) == 0
    assert machine_rank(1, {"GMPIPE_MACHINE_RANK": "0"}) == 0
    with pytest.raises(GmpipeError, match=r"GMPIPE_MACHINE_RANK=1: the machine rank must be in 0\.\.0"):
        machine_rank(1, {"GMPIPE_MACHINE_RANK": "1"})


@pytest.mark.parametrize("environ, message", [
    ({}, "compute.num_machines is 2: set GMPIPE_MACHINE_RANK in each machine's environment"),
    ({"GMPIPE_MACHINE_RANK": "2"}, r"GMPIPE_MACHINE_RANK=2: the machine rank must be in 0\.\.1"),
    ({"NODE_RANK": "-1"}, r"NODE_RANK=-1: the machine rank must be in 0\.\.1"),
    ({"SLURM_NODEID": "one"}, "SLURM_NODEID='one': a machine rank must be an integer"),
    ({"GMPIPE_MACHINE_RANK": "x" * 10_000}, "a machine rank must be an integer"),
])
def test_bad_or_missing_machine_rank_is_one_clear_line(environ, message):
    with pytest.raises(GmpipeError, match=message) as error:
        machine_rank(2, environ)
    assert "\n" not in str(error.value) and len(str(error.value)) < 200


def test_machine_rank_in_params_is_refused_with_what_to_do(tmp_path, capsys):
    raw = smoke_params(compute={"machine_rank": 1})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    assert main(["check-params", str(tmp_path / "params.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"{tmp_path / 'params.yaml'}: compute: machine_rank is no longer a params key (every machine "
                   "reads this same file): delete it and set GMPIPE_MACHINE_RANK in each machine's environment "
                   "instead (got machine_rank: 1)")
    with pytest.raises(Exception, match="main_process_ip is required with num_machines > 1"):
        parse_params(smoke_params(compute={"num_machines": 2}))


def test_loopback_addresses():
    assert all(map(is_loopback, [None, "localhost", "127.0.0.1", "127.0.0.2", "::1"]))
    assert not any(map(is_loopback, ["10.0.0.5", "0.0.0.0", "::", "master.cluster.local", "192.0.2.2"]))


def test_launch_command_carries_the_environment_rank_and_a_free_port(monkeypatch):
    compute = parse_params(smoke_params(compute={"num_processes": 2, "num_machines": 2, "main_process_ip": "10.0.0.5",
                                                 "main_process_port": 29511})).compute
    command, _ = accelerate_command(compute, "train_ldm", "params.yaml", ".", "summary.json", rank=1)
    assert command[1:3] == ["-m", "gmpipe.rendezvous"]
    flags = dict(zip(command[3:], command[4:], strict=False))
    assert (flags["--num_processes"], flags["--num_machines"], flags["--machine_rank"]) == ("4", "2", "1")
    assert flags["--main_process_ip"] == "10.0.0.5" and flags["--main_process_port"] == "29511"

    # A taken port: on one machine the processes meet on a free one; machine 0 of several refuses in one line.
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        one = parse_params(smoke_params(compute={"num_processes": 2, "main_process_port": port})).compute
        assert rendezvous_port(one, 0) != port
        several = one.model_copy(update={"num_machines": 2, "main_process_ip": "127.0.0.1"})
        with pytest.raises(GmpipeError, match=f"compute.main_process_port: port {port} is already in use"):
            rendezvous_port(several, 0)
        assert rendezvous_port(several, 1) == port  # only machine 0 listens
