"""Real single-node SLURM and Grid Engine clusters for the job-script tests.

The session fixtures ``slurm_cluster`` and ``sge_cluster`` bring the daemons up (installing the
Debian packages through docker/install_schedulers.sh when they are missing), hand the tests a
small handle, and stop at the end only the daemons they started themselves. They skip with the
reason when the machine cannot host a scheduler: not root, no apt-get, or a configuration they
did not write is already in place (they never overwrite a real site's setup).
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MARKER = "# written by spngd tests/schedulers.py"


def _run(cmd: list[str], *, env: dict[str, str] | None = None, check: bool = True, input: str | None = None,
         timeout: float = 60) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(cmd, env=env, input=input, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip() or res.stdout.strip()}")
    return res


def wait_for(what: str, ok: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)


def _succeeds(cmd: list[str], env: dict[str, str] | None = None) -> bool:
    try:
        return subprocess.run(cmd, env=env, capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _require(binaries: list[str]) -> None:
    """Skip unless root; install the scheduler packages when a binary is missing."""
    if os.geteuid() != 0:
        pytest.skip("scheduler daemons need root (munge keys, spool folders, SGE's admin user)")
    if all(shutil.which(b) for b in binaries):
        return
    if not shutil.which("apt-get"):
        pytest.skip(f"{', '.join(binaries)} not installed and no apt-get to install them")
    res = subprocess.run(["bash", str(REPO / "docker/install_schedulers.sh")], capture_output=True, text=True,
                         timeout=900)
    missing = [b for b in binaries if not shutil.which(b)]
    if missing:
        tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no output"]
        pytest.skip(f"could not install {', '.join(missing)}: {tail[0]}")


def _write_owned(path: Path, text: str) -> None:
    """Write a config file unless a file this module did not write is already there."""
    if path.exists() and MARKER not in path.read_text():
        pytest.skip(f"{path} exists and was not written by the tests; not touching a real setup")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{MARKER}\n{text}")


def _pid_from(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _stop_pid(pidfile: Path) -> None:
    pid = _pid_from(pidfile)
    if pid is None:
        return
    try:
        os.kill(pid, 15)
    except ProcessLookupError:
        return
    wait_for(f"pid {pid} to exit", lambda: not Path(f"/proc/{pid}").exists(), timeout=30)


@dataclass
class SlurmCluster:
    """One node ('localhost') with all of this machine's CPUs, partition 'debug'."""

    cpus: int = 0
    started: list[str] = field(default_factory=list)

    conf = Path("/etc/slurm/slurm.conf")
    munge_pid = Path("/run/munge/munged.pid")

    def start(self) -> None:
        self._munge()
        probe = _run(["slurmd", "-C"]).stdout
        self.cpus = int(re.search(r"CPUs=(\d+)", probe).group(1))  # type: ignore[union-attr]
        memory = int(re.search(r"RealMemory=(\d+)", probe).group(1))  # type: ignore[union-attr]
        # KillWait=30 is SLURM's default: the time scancel and preemption leave between TERM and KILL,
        # in which the ranks checkpoint (tests/test_preempt.py).
        text = f"""\
ClusterName=local
SlurmctldHost=localhost
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmUser=root
ReturnToService=2
MpiDefault=none
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
JobAcctGatherType=jobacct_gather/none
KillWait=30
NodeName=localhost CPUs={self.cpus} RealMemory={memory} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""
        if _succeeds(["scontrol", "ping"]) and self._node_state().startswith("idle"):
            if self.conf.read_text() != f"{MARKER}\n{text}":  # ours (or skip), from an older version
                _write_owned(self.conf, text)
                _run(["scontrol", "reconfigure"])
            return  # a cluster from an earlier session is up: reuse it, leave it running
        for d in ("/var/spool/slurmctld", "/var/spool/slurmd", "/var/log/slurm"):
            Path(d).mkdir(parents=True, exist_ok=True)
        _write_owned(self.conf, text)
        _run(["slurmctld", "-c"])  # -c: forget jobs of earlier sessions
        _run(["slurmd", "-N", "localhost"])
        self.started.append("slurm")
        wait_for("the SLURM node to become idle", lambda: self._node_state().startswith("idle"), timeout=60)

    def _munge(self) -> None:
        if _succeeds(["bash", "-c", "munge -n | unmunge"]):
            return
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        munge = pwd.getpwnam("munge")
        os.chown(key, munge.pw_uid, munge.pw_gid)
        key.chmod(0o400)
        Path("/run/munge").mkdir(exist_ok=True)
        os.chown("/run/munge", munge.pw_uid, munge.pw_gid)
        _run(["su", "-s", "/bin/sh", "munge", "-c", "/usr/sbin/munged"])
        self.started.append("munge")
        wait_for("munged", lambda: _succeeds(["bash", "-c", "munge -n | unmunge"]), timeout=20)

    def _node_state(self) -> str:
        res = _run(["sinfo", "-h", "-n", "localhost", "-o", "%T"], check=False)
        return res.stdout.strip()

    def stop(self) -> None:
        if "slurm" in self.started:
            _run(["scontrol", "shutdown"], check=False)
            pids = [_pid_from(Path(f"/run/{d}.pid")) for d in ("slurmctld", "slurmd")]
            wait_for("SLURM daemons to exit", lambda: not any(Path(f"/proc/{p}").exists() for p in pids if p),
                     timeout=30)
        if "munge" in self.started:
            _stop_pid(self.munge_pid)

    def job_state(self, job_id: str) -> str:
        """State of one job ('' once it left the queue; accounting is off here)."""
        res = _run(["squeue", "-h", "-j", job_id, "-o", "%T"], check=False)
        return res.stdout.strip() if res.returncode == 0 else ""

    def start_soon(self, job_id: str) -> None:
        """A requeued job waits ~2 minutes (BeginTime) before it may start again; shorten that to a
        few seconds (not zero: slurmd refuses a credential issued in the second it revoked the old one)."""
        _run(["scontrol", "update", f"JobId={job_id}", "StartTime=now+3"])

    def wait_gone(self, job_ids: list[str], timeout: float) -> None:
        wait_for(f"SLURM jobs {job_ids} to finish", lambda: not any(self.job_state(j) for j in job_ids), timeout)


SGE_ENV = {"SGE_ROOT": "/var/lib/gridengine", "SGE_CELL": "default"}
_NONE_FIELDS = ("load_scaling", "complex_values", "user_lists", "xuser_lists", "projects", "xprojects",
                "usage_scaling", "report_variables")


@dataclass
class SgeCluster:
    """Exec host 'localhost', queue 'test.q' with ``slots`` slots, parallel environment 'mpi'."""

    slots: int = 2
    started: list[str] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, **SGE_ENV}

    @property
    def common(self) -> Path:
        return Path(SGE_ENV["SGE_ROOT"]) / SGE_ENV["SGE_CELL"] / "common"

    def qconf(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run(["qconf", *args], env=self.env, check=check)

    def start(self, workdir: Path) -> None:
        host = socket.gethostname()
        (self.common / "act_qmaster").write_text(f"{host}\n")
        _write_owned(self.common / "host_aliases", f"localhost {host}\n")
        if not _succeeds(["qconf", "-sh"], self.env):
            _run(["/usr/sbin/sge_qmaster"], env=self.env)
            self.started.append("qmaster")
            wait_for("sge_qmaster", lambda: _succeeds(["qconf", "-sh"], self.env), timeout=60)
        self._configure(workdir)
        if not self._execd_running():
            _run(["/usr/sbin/sge_execd"], env=self.env)
            self.started.append("execd")
            wait_for("sge_execd to start", self._execd_running, timeout=30)
        wait_for("sge_execd to report load", self._host_up, timeout=90)

    def _execd_running(self) -> bool:
        """From its pid file: qhost keeps showing the last load report of an execd that is gone."""
        pid = _pid_from(Path("/var/spool/gridengine/execd/localhost/execd.pid"))
        return pid is not None and Path(f"/proc/{pid}").exists()

    def _apply(self, kind: str, name: str, listed: str, text: str, workdir: Path) -> None:
        """Add or modify one object from a file, since the interactive qconf forms open an editor."""
        path = workdir / f"sge-{kind}-{name}"
        path.write_text(text)
        exists = name in self.qconf(listed, check=False).stdout.split()
        self.qconf(f"-{'M' if exists else 'A'}{kind}", str(path))

    def _configure(self, workdir: Path) -> None:
        self._apply("e", "localhost", "-sel", "hostname localhost\n" + "".join(f"{f} NONE\n" for f in _NONE_FIELDS),
                    workdir)
        if "localhost" not in self.qconf("-ss", check=False).stdout.split():
            self.qconf("-as", "localhost")
        self._apply("p", "mpi", "-spl", f"""\
pe_name mpi
slots {self.slots}
user_lists NONE
xuser_lists NONE
start_proc_args NONE
stop_proc_args NONE
allocation_rule $fill_up
control_slaves TRUE
job_is_first_task FALSE
urgency_slots min
accounting_summary FALSE
qsort_args NONE
""", workdir)
        self._apply("q", "test.q", "-sql", _queue_conf("test.q", self.slots), workdir)
        sched = self.qconf("-ssconf").stdout  # schedule on submit and every second, not every 15 s
        for key, value in (("schedule_interval", "0:0:1"), ("flush_submit_sec", "1"), ("flush_finish_sec", "1")):
            sched = re.sub(rf"^{key}\s+\S+", f"{key} {value}", sched, flags=re.M)
        (workdir / "sched_conf").write_text(sched)
        self.qconf("-Msconf", str(workdir / "sched_conf"))
        conf = self.qconf("-sconf", "global").stdout
        conf = re.sub(r"^(min_uid|min_gid)\s+\d+", r"\1 0", conf, flags=re.M)
        (workdir / "global").write_text(conf)  # qconf -Mconf takes the object's name from the file name
        self.qconf("-Mconf", str(workdir / "global"))

    def _host_up(self) -> bool:
        res = _run(["qhost", "-h", "localhost"], env=self.env, check=False)
        rows = [line.split() for line in res.stdout.splitlines() if line.startswith("localhost")]
        return bool(rows) and rows[0][3] != "-"  # LOAD column is '-' until execd reports

    def stop(self) -> None:
        if "execd" in self.started:
            self.qconf("-ke", "localhost", check=False)
        if "qmaster" in self.started:
            self.qconf("-km", check=False)
            wait_for("sge_qmaster to exit", lambda: not _succeeds(["qconf", "-sh"], self.env), timeout=30)

    def job_listed(self, job_id: str) -> bool:
        return _succeeds(["qstat", "-j", job_id], self.env)

    def wait_gone(self, job_ids: list[str], timeout: float) -> None:
        wait_for(f"Grid Engine jobs {job_ids} to finish", lambda: not any(self.job_listed(j) for j in job_ids), timeout)


def _queue_conf(name: str, slots: int) -> str:
    """A full queue_conf(5) record: qconf -Aq refuses one with any field missing."""
    fields = {
        "qname": name, "hostlist": "localhost", "seq_no": "0", "load_thresholds": "NONE",
        "suspend_thresholds": "NONE", "nsuspend": "1", "suspend_interval": "00:05:00", "priority": "0",
        "min_cpu_interval": "00:05:00", "processors": "UNDEFINED", "qtype": "BATCH INTERACTIVE",
        "ckpt_list": "NONE", "pe_list": "mpi", "rerun": "FALSE", "slots": str(slots), "tmpdir": "/tmp",
        "shell": "/bin/bash", "prolog": "NONE", "epilog": "NONE", "shell_start_mode": "unix_behavior",
        "starter_method": "NONE", "suspend_method": "NONE", "resume_method": "NONE",
        "terminate_method": "NONE", "notify": "00:00:60", "owner_list": "NONE", "user_lists": "NONE",
        "xuser_lists": "NONE", "subordinate_list": "NONE", "complex_values": "NONE", "projects": "NONE",
        "xprojects": "NONE", "calendar": "NONE", "initial_state": "default",
    }
    limits = ("s_rt", "h_rt", "s_cpu", "h_cpu", "s_fsize", "h_fsize", "s_data", "h_data", "s_stack", "h_stack",
              "s_core", "h_core", "s_rss", "h_rss", "s_vmem", "h_vmem")
    fields.update({lim: "INFINITY" for lim in limits})
    return "".join(f"{k} {v}\n" for k, v in fields.items())


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    _require(["slurmctld", "slurmd", "sbatch", "munged"])
    cluster = SlurmCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def sge_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SgeCluster]:
    _require(["/usr/sbin/sge_qmaster", "/usr/sbin/sge_execd", "qsub"])
    cluster = SgeCluster()
    try:
        cluster.start(tmp_path_factory.mktemp("sge"))
        yield cluster
    finally:
        cluster.stop()
