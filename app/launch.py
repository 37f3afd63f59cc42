"""Who am I in the job, which device is mine, and how the ranks find each other.

Works the same under mpirun (Open MPI, MPICH, Intel MPI), srun, horovodrun and a plain
``python``: the rank layout comes from the launcher's environment, and the torch.distributed
rendezvous (address, free port) is settled over MPI, so users never set MASTER_ADDR/PORT.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import sys
import time
import traceback
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import torch
import torch.distributed as dist

from app.comm.base import Comm, CommError
from app.config import CommConfig
from app.errors import LaunchError, UserError

if TYPE_CHECKING:
    from mpi4py import MPI


@dataclass(frozen=True)
class World:
    """This process's place in the job: global and node-local rank and size."""

    rank: int
    size: int
    local_rank: int
    local_size: int
    launcher: str  # openmpi | mpich | horovodrun | slurm | single


# (launcher, rank, size, local rank, local size) variables, in priority order. MPI comes first:
# an mpirun inside a batch allocation still carries the batch shell's SLURM_* variables.
_SOURCES: tuple[tuple[str, str, str, str, str], ...] = (
    ("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
     "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("mpich", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    ("horovodrun", "HOROVOD_RANK", "HOROVOD_SIZE", "HOROVOD_LOCAL_RANK", "HOROVOD_LOCAL_SIZE"),
    ("slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE"),
)


def _int(env: Mapping[str, str], var: str) -> int:
    value = env[var]
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"launch: {var}={value!r} is not an integer") from None


def _slurm_tasks_on_node(env: Mapping[str, str]) -> int:
    """This node's entry of SLURM_TASKS_PER_NODE, e.g. '4(x2),3' -> [4, 4, 3][SLURM_NODEID]."""
    spec = env["SLURM_TASKS_PER_NODE"]
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m is None:
            raise LaunchError(f"launch: SLURM_TASKS_PER_NODE={spec!r} is not like '4(x2),3'")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    node = _int(env, "SLURM_NODEID") if "SLURM_NODEID" in env else 0
    if not 0 <= node < len(counts):
        raise LaunchError(f"launch: SLURM_NODEID={node} has no entry in SLURM_TASKS_PER_NODE={spec!r}")
    return counts[node]


def discover(env: Mapping[str, str] = os.environ) -> World:
    """The World described by the launcher's environment variables (a single process if none).

    Rank and size come from the first launcher whose rank variable is set. A launcher that sets
    no node-local variables (e.g. MPICH under ``srun --mpi=pmi2``) takes them from the next
    launcher down the list that does.
    """
    for i, (launcher, rank_var, size_var, _, _) in enumerate(_SOURCES):
        if rank_var not in env:
            continue
        if size_var not in env:
            raise LaunchError(f"launch: {rank_var} is set but {size_var} is not")
        rank, size = _int(env, rank_var), _int(env, size_var)
        local = next(((lr, ls) for _, _, _, lr, ls in _SOURCES[i:] if lr in env), None)
        if local is None:
            raise LaunchError(f"launch: {launcher} sets no node-local rank ({_SOURCES[i][3]}); "
                              "cannot bind devices")
        local_rank_var, local_size_var = local
        local_rank = _int(env, local_rank_var)
        if local_size_var in env:
            local_size = _int(env, local_size_var)
        elif local_size_var == "SLURM_NTASKS_PER_NODE" and "SLURM_TASKS_PER_NODE" in env:
            local_size = _slurm_tasks_on_node(env)
        else:
            raise LaunchError(f"launch: {local_rank_var} is set but {local_size_var} is not")
        if not (size >= 1 and 0 <= rank < size and 1 <= local_size <= size
                and 0 <= local_rank < local_size):
            raise LaunchError(f"launch: inconsistent {launcher} layout: rank {rank} of {size}, "
                              f"local rank {local_rank} of {local_size}")
        return World(rank, size, local_rank, local_size, launcher)
    return World(0, 1, 0, 1, "single")


def global_rank(env: Mapping[str, str] = os.environ) -> int:
    """This process's global rank from the launchers' rank variables alone, 0 if none parses.

    Decides who prints an error that every rank sees: it must work exactly when ``discover``
    fails (e.g. MPICH's MPI_LOCALRANKID without MPI_LOCALNRANKS), so it reads nothing else.
    """
    for _, rank_var, _, _, _ in _SOURCES:
        with contextlib.suppress(KeyError, ValueError):
            return int(env[rank_var])
    return 0


def select_device(world: World, requested: str) -> torch.device:
    """``cuda:<local_rank % visible GPUs>`` (made current) when CUDA is wanted and present, else cpu;
    and, unless OMP_NUM_THREADS says otherwise, an equal share of this process's cores per rank."""
    if requested not in ("auto", "cpu", "cuda"):
        raise LaunchError(f"launch: device {requested!r} is not one of auto, cpu, cuda")
    if "OMP_NUM_THREADS" not in os.environ:  # ranks sharing a node must not oversubscribe its cores
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores // world.local_size))
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise LaunchError("launch: device 'cuda' was requested but no CUDA device is visible")
    device = torch.device("cuda", world.local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def choose_backend(requested: str, env: Mapping[str, str] = os.environ) -> str:
    """``auto`` means Horovod when horovodrun started us (HOROVOD_RANK is set), else torch."""
    if requested == "auto":
        return "horovod" if "HOROVOD_RANK" in env else "torch"
    if requested not in ("torch", "horovod"):
        raise LaunchError(f"launch: comm backend {requested!r} is not one of auto, torch, horovod")
    return requested


def init_comm(world: World, cfg: CommConfig, device: torch.device) -> Comm:
    """Start the collective library chosen by ``cfg.backend`` and return the world communicator."""
    if choose_backend(cfg.backend) == "horovod":
        return _init_horovod(world, cfg, device)
    return _init_torch(world, cfg, device)


def _init_torch(world: World, cfg: CommConfig, device: torch.device) -> Comm:
    from app.comm.torch_backend import TorchComm

    timeout = timedelta(seconds=cfg.timeout_s)
    store = dist.HashStore() if world.size == 1 else _rendezvous(world, timeout)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store,
                            rank=world.rank, world_size=world.size, timeout=timeout,
                            device_id=device if device.type == "cuda" else None)
    return TorchComm(device, timeout)


def _mpi_comm_world(world: World) -> MPI.Intracomm:
    """MPI_COMM_WORLD, checked against the launcher's environment.

    A mismatch means e.g. ``python`` was run directly inside a batch allocation whose SLURM_*
    variables claim several tasks: fail with one line instead of waiting for ranks that never come.
    """
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    if (comm.Get_rank(), comm.Get_size()) != (world.rank, world.size):
        raise LaunchError(f"launch: {world.launcher} says rank {world.rank} of {world.size}, MPI says "
                          f"{comm.Get_rank()} of {comm.Get_size()}; start the job with mpirun or srun")
    return comm


def _rendezvous(world: World, timeout: timedelta) -> dist.Store:
    """A TCPStore served by rank 0 on a free port, its address broadcast over MPI."""
    mpi = _mpi_comm_world(world)
    hosts = mpi.allgather(socket.gethostname())
    if world.rank == 0:
        others = [h for h in hosts if h != hosts[0]]
        addr = _address_towards(others[0]) if others else "127.0.0.1"
        store = dist.TCPStore(addr, 0, world.size, is_master=True, wait_for_workers=False,
                              timeout=timeout)
        mpi.bcast((addr, store.port), root=0)
        return store
    addr, port = mpi.bcast(None, root=0)
    return dist.TCPStore(addr, port, world.size, is_master=False, timeout=timeout)


def _address_towards(host: str) -> str:
    """The local interface address the kernel routes to ``host`` over, i.e. one it can reach."""
    try:
        peer = socket.gethostbyname(host)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((peer, 9))  # UDP: picks the route, sends nothing
            return str(s.getsockname()[0])
    except OSError as exc:
        raise LaunchError(f"launch: cannot find a route from rank 0 to host {host!r}: {exc}") from None


def _init_horovod(world: World, cfg: CommConfig, device: torch.device) -> Comm:
    # Horovod's stall watchdog is its collective timeout: shut down (every rank's op raises)
    # once a collective has waited cfg.timeout_s; the check interval must not exceed that.
    os.environ["HOROVOD_STALL_CHECK_TIME_SECONDS"] = str(min(60, cfg.timeout_s))
    os.environ["HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"] = str(cfg.timeout_s)
    # Every op carries a unique sequence name (see horovod_backend), so Horovod's response cache
    # would only ever miss and warn about evictions: turn it off unless the user set it.
    os.environ.setdefault("HOROVOD_CACHE_CAPACITY", "0")
    from app.comm.horovod_backend import HorovodComm

    comm = HorovodComm.init_world(device)
    if (comm.rank, comm.size) != (world.rank, world.size):
        raise LaunchError(f"launch: {world.launcher} says rank {world.rank} of {world.size}, Horovod "
                          f"says {comm.rank} of {comm.size}")
    return comm


def abort(exit_code: int) -> NoReturn:
    """End the whole job now: MPI_Abort when MPI is up (the launcher kills every rank), else exit.

    Without it, the other ranks would sit in their next collective until its timeout.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.COMM_WORLD.Abort(exit_code)
    os._exit(exit_code)


_COMM_DIR = Path(__file__).resolve().parent / "comm"
_PEER_GRACE_S = 5.0


def _failed_in_comm(exc: BaseException) -> bool:
    return any(Path(frame.f_code.co_filename).resolve().is_relative_to(_COMM_DIR)
               for frame, _ in traceback.walk_tb(exc.__traceback__))


def describe_failure(exc: BaseException, rank: int) -> str:
    """One line for a rank's failure: what, and where it was raised. The full traceback is only
    printed on request (SPNGD_TRACEBACK=1): a 1,000-rank log is read by people, not debuggers."""
    frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    where = f" ({Path(frame.filename).name}:{frame.lineno})" if frame else ""
    return f"spngd: error on rank {rank}: {type(exc).__name__}: {exc}{where}"


@contextlib.contextmanager
def abort_on_error(world: World) -> Iterator[None]:
    """Wrap a rank's main: an exception on any rank ends every rank promptly, non-zero.

    The failing rank reports once and aborts the job. An error raised inside a collective is
    usually the echo of a peer that died first, so such a rank waits a few seconds for the launcher
    to kill it before reporting (keeping 1,000-rank logs to the one real error). ``SystemExit``
    (a deliberate exit every rank takes, such as checkpoint-and-requeue) and ``UserError`` (input
    errors every rank sees alike) propagate to the caller unchanged.
    """
    try:
        yield
    except (SystemExit, UserError):
        raise
    except KeyboardInterrupt:
        abort(130)
    except BaseException as exc:
        if world.size > 1 and not isinstance(exc, CommError) and _failed_in_comm(exc):
            time.sleep(_PEER_GRACE_S)
        print(describe_failure(exc, world.rank), file=sys.stderr, flush=True)
        if os.environ.get("SPNGD_TRACEBACK"):
            traceback.print_exception(exc, file=sys.stderr)
        abort(1)
