"""Which launcher started this process, and its rank and world size (no torch import here:
the command line reads it too, to end an MPI launch when a rank fails).

torchrun and the deepspeed launcher set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; an MPI
launch (mpirun) gives rank and size through mpi4py, and rank 0 broadcasts an address and a free
port; in an srun step the rank and size come from SLURM_PROCID and SLURM_STEP_NUM_TASKS
(launch/slurm.sbatch sets MASTER_ADDR).
"""

from __future__ import annotations

import functools
import ipaddress
import os
import socket
import sys

from stairscale.errors import ConfigError

MPI_SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE")
_rank_from_mpi = False  # set once _mpi_environment has read this process's rank from MPI


def srun_step_tasks() -> int:
    """The tasks of the srun step this process belongs to (1 outside one: a batch script or salloc
    shell has SLURM_PROCID and SLURM_NTASKS too, but no step of its own)."""
    return int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) if "SLURM_PROCID" in os.environ else 1


def started_by_mpi() -> bool:
    """mpirun started this process. srun with an MPI plugin (pmi2, pmix) sets MPI's variables too,
    for the same tasks as its step; mpirun inside an allocation starts other processes than the
    step's tasks (hydra's proxies are the step's tasks), so its size differs."""
    if not any(key in os.environ for key in (*MPI_SIZE_VARIABLES, "PMIX_RANK")):
        return False
    sizes = {int(os.environ[key]) for key in MPI_SIZE_VARIABLES if key in os.environ}
    step = srun_step_tasks()
    return step == 1 or not sizes <= {step}


@functools.cache  # the MPI branch sets RANK for later readers; ask once per process
def launch_environment() -> tuple[str, int, int]:
    """(launcher, rank, world size) of this process, read from what the launcher set. MPI comes
    before SLURM: processes that mpirun starts inside an allocation inherit its SLURM variables."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in os.environ else "deepspeed" if "CROSS_RANK" in os.environ else "env"
        return launcher, int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if started_by_mpi():
        return _mpi_environment()
    if srun_step_tasks() > 1:
        if "MASTER_ADDR" not in os.environ:
            raise ConfigError("srun started this task (SLURM_STEP_NUM_TASKS > 1) without MASTER_ADDR: set MASTER_ADDR "
                              "(and MASTER_PORT) to the first node, as launch/slurm.sbatch does")
        os.environ["RANK"], os.environ["WORLD_SIZE"] = os.environ["SLURM_PROCID"], os.environ["SLURM_STEP_NUM_TASKS"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
        return "srun", int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return "single", 0, 1


def _mpi_environment() -> tuple[str, int, int]:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    announced = {key: os.environ[key] for key in MPI_SIZE_VARIABLES if key in os.environ}
    if comm.Get_size() == 1 and any(int(size) > 1 for size in announced.values()):
        raise ConfigError(f"the MPI launcher announced {announced}, but mpi4py's MPI (MPICH, from the venv) sees one "
                          "process: start the ranks with the mpirun of the same MPI (launch/mpirun.sh)")
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)  # the ranks on this node
    if comm.Get_size() > 1:
        address = comm.bcast(rendezvous_address(node.Get_size() < comm.Get_size()) if comm.Get_rank() == 0 else None, root=0)
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = address[0], str(address[1])
    # What torchrun would have set, for DeepSpeed and for device selection.
    os.environ["RANK"], os.environ["WORLD_SIZE"] = str(comm.Get_rank()), str(comm.Get_size())
    os.environ["LOCAL_RANK"] = str(node.Get_rank())
    global _rank_from_mpi
    _rank_from_mpi = True
    return "mpirun", comm.Get_rank(), comm.Get_size()


def abort_mpi_launch(exit_code: int, message: str = "") -> None:
    """End every rank of an mpirun launch when this one fails (after printing `message`): mpirun
    does not notice a rank that exits normally, and the others would wait in a collective until
    its timeout. A process that another launcher gave RANK and WORLD_SIZE (say torchrun started
    by mpirun, one per node) is not an MPI rank, whatever MPI variables it inherited."""
    given_a_rank = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if not _rank_from_mpi and (given_a_rank or not started_by_mpi()):
        return
    from mpi4py import MPI

    if MPI.COMM_WORLD.Get_size() > 1:
        print(message, end="", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        MPI.COMM_WORLD.Abort(exit_code)


def free_port(host: str = "") -> int:
    """A port free on `host` (an address of this machine; "" for any)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def rendezvous_address(spans_nodes: bool) -> tuple[str, int]:
    """Rank 0's address and a free port there, for an MPI launch: MASTER_ADDR if set (it must be
    an address of this host, where torch's store will listen), else the address other nodes reach."""
    given = os.environ.get("MASTER_ADDR")
    host = given or _routable_address()
    named = f"MASTER_ADDR={host}" if given else f"rank 0's address {host} (found from its host name; set MASTER_ADDR)"
    try:
        port = free_port(host)
    except OSError as err:
        raise ConfigError(f"{named} is not an address of rank 0's host {socket.gethostname()} ({err.strerror}): "
                          "unset it, or set it to that host's address") from err
    if spans_nodes and ipaddress.ip_address(socket.gethostbyname(host)).is_loopback:
        raise ConfigError(f"{named} is a loopback address, but the ranks run on several nodes: "
                          "set MASTER_ADDR to rank 0's host address as the other nodes reach it")
    return host, port


def _routable_address() -> str:
    """This host's address as other nodes see it: the source address of a route out (a UDP
    connect sends nothing). The host name often resolves to loopback (127.0.1.1 on Debian)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            return s.getsockname()[0]
    except OSError:  # no route at all: a single machine
        return socket.gethostbyname(socket.gethostname())
