"""How the processes of a multi-process run find each other: which machine this is, and where the store listens.

**Machine rank.** Every machine runs the same command from the same committed ``params.yaml``, so its rank cannot
come from that file. :func:`machine_rank` reads it from the environment, first match wins:

    GMPIPE_MACHINE_RANK    set by the user or the job template
    PET_NODE_RANK          torchrun's environment form of ``--node-rank`` (e.g. set by Kubeflow's PyTorchJob)
    NODE_RANK              the convention accelerate and Lightning read
    SLURM_NODEID           SLURM: this node's index in the job's allocation
    JOB_COMPLETION_INDEX   Kubernetes Indexed Job: this pod's index

With ``num_machines: 1`` the rank is 0 and only ``GMPIPE_MACHINE_RANK`` is checked (a scheduler's node index says
nothing about a one-machine run).

**Store.** torch's rendezvous store (a ``TCPStore``, created by the launcher on the main machine) listens on every
interface whatever address it is given. When the main address is loopback (one machine, or several processes
standing in for machines on one host) nothing outside the host has any business connecting, so
``python -m gmpipe.rendezvous ARGS`` runs ``accelerate launch ARGS`` with a store that listens on that loopback
address only, and the ranks' gloo / NCCL sockets are kept on the loopback interface too. Any other main address
keeps torch's behaviour (the other machines must reach it, possibly through an address that is not local, such as
a Kubernetes service).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from collections.abc import Mapping

from gmpipe.errors import GmpipeError

MACHINE_RANK_VARIABLES = ("GMPIPE_MACHINE_RANK", "PET_NODE_RANK", "NODE_RANK", "SLURM_NODEID", "JOB_COMPLETION_INDEX")
LOOPBACK_DEFAULT = "127.0.0.1"  # torchrun's master address on one machine


def machine_rank(num_machines: int, environ: Mapping[str, str] | None = None) -> int:
    """This machine's rank in 0..num_machines-1, from the first variable of ``MACHINE_RANK_VARIABLES`` set."""
    environ = os.environ if environ is None else environ
    names = MACHINE_RANK_VARIABLES if num_machines > 1 else MACHINE_RANK_VARIABLES[:1]
    name = next((name for name in names if environ.get(name, "").strip()), None)
    if name is None:
        if num_machines > 1:
            raise GmpipeError(
                f"compute.num_machines is {num_machines}: set GMPIPE_MACHINE_RANK in each machine's environment "
                f"(0 on the main machine, 1..{num_machines - 1} on the others)"
            )
        return 0
    text = environ[name].strip()
    try:
        rank = int(text)
    except ValueError:
        raise GmpipeError(f"{name}={text[:40]!r}: a machine rank must be an integer") from None
    if not 0 <= rank < num_machines:
        raise GmpipeError(
            f"{name}={rank}: the machine rank must be in 0..{num_machines - 1} (compute.num_machines is {num_machines})"
        )
    return rank


def is_loopback(address: str | None) -> bool:
    """Whether ``address`` (an IP or a host name; None: torchrun's default) names this host's loopback."""
    if address is None or address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def loopback_interface() -> str | None:
    """The name of the loopback network interface ("lo" on Linux, "lo0" on macOS), if there is one."""
    names = [name for _, name in socket.if_nameindex()]
    return "lo" if "lo" in names else next((name for name in names if name.startswith("lo")), None)


def port_in_use(address: str, port: int) -> bool:
    """Whether something already listens on ``address:port``."""
    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        return probe.connect_ex((address, port)) == 0


def free_port(address: str = LOOPBACK_DEFAULT) -> int:
    with socket.create_server((address, 0)) as listener:
        return listener.getsockname()[1]


def _loopback_store(tcp_store):
    """A ``TCPStore`` factory that, for the server side on a loopback address, hands torch a socket bound to that
    address (``master_listen_fd``) instead of letting it listen on every interface."""

    def make_store(host_name, port, world_size=None, is_master=False, *args, **kwargs):
        if is_master and is_loopback(host_name) and "master_listen_fd" not in kwargs:
            address = LOOPBACK_DEFAULT if host_name == "localhost" else host_name
            listener = socket.create_server((address, port), family=socket.AF_INET6 if ":" in address else
                                            socket.AF_INET, backlog=socket.SOMAXCONN)
            kwargs["master_listen_fd"] = listener.detach()  # the store owns the socket from here on
        return tcp_store(host_name, port, world_size, is_master, *args, **kwargs)

    return make_store


def main(argv: list[str] | None = None) -> int:
    """``accelerate launch`` with the loopback store (see the module docstring); the arguments are accelerate's."""
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import static_tcp_rendezvous

    args = launch_command_parser().parse_args(argv)
    main_address = args.main_process_ip if (args.num_machines or 1) > 1 else None
    if is_loopback(main_address):
        # accelerate starts every machine through torchrun's static rendezvous, whose server side is created here,
        # in this process; a torch without that hook would silently listen everywhere again, so refuse.
        if not hasattr(static_tcp_rendezvous, "TCPStore"):
            print("gmpipe: error: this torch version's static rendezvous has no TCPStore to bind to loopback",
                  file=sys.stderr)
            return 1
        static_tcp_rendezvous.TCPStore = _loopback_store(static_tcp_rendezvous.TCPStore)
        interface = loopback_interface()
        if interface:
            for variable in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
                os.environ.setdefault(variable, interface)
    try:
        launch_command(args)
    except ChildFailedError as exc:
        # The failing rank has printed its own error (one `gmpipe: error:` line, or its traceback for a bug);
        # torch's report of it would only bury that line.
        codes = ", ".join(f"local rank {rank}: exit code {failure.exitcode}" for rank, failure in exc.failures.items())
        print(f"gmpipe: a process on this machine failed ({codes})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
