"""What differs between SLURM, Grid Engine (SGE/UGE/AGE) and PBS Professional outside the script
text: the submit command line, the job-id format, and how a checkpointed job runs again."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass

from app.errors import UserError
from app.submit.render import Family, Job


@dataclass(frozen=True)
class SchedulerFamily:
    """The shell variables and defaults the shared template needs from a family."""

    job_id_var: str          # this job's id inside the script
    array_index_var: str     # the array task's index inside the script
    hostfile: str            # mpirun's host list when the profile names none ('' = the allocation)
    warns: bool              # the scheduler itself signals before the walltime (else: the script's timer)


FAMILIES: dict[Family, SchedulerFamily] = {
    "slurm": SchedulerFamily("SLURM_JOB_ID", "SLURM_ARRAY_TASK_ID", "", True),
    "sge": SchedulerFamily("JOB_ID", "SGE_TASK_ID", "$hostfile", False),  # sge.sh.tmpl writes $hostfile
    "pbs": SchedulerFamily("PBS_JOBID", "PBS_ARRAY_INDEX", "$PBS_NODEFILE", False),
}


def _group_args(job: Job) -> list[str]:
    """UGE/AGE (ABCI 2, TSUBAME) bill a group given to qsub; SLURM and PBS take it as a directive."""
    return ["-g", job.group] if job.group and job.profile.scheduler == "sge" else []


def submit_argv(job: Job) -> list[str]:
    """The submit command. A sweep's array range is an option here, not a directive, so that the
    same script can be resubmitted for one trial (PBS cannot drop a ``-J`` directive)."""
    family, script, k = job.profile.scheduler, str(job.script_path), len(job.trials)
    if family == "slurm":
        return ["sbatch", "--parsable", *([f"--array=1-{k}"] if k else []), script]
    if family == "sge":
        return ["qsub", "-terse", *_group_args(job), *(["-t", f"1-{k}"] if k else []), script]
    return ["qsub", *(["-J", f"1-{k}"] if k else []), script]


def again_command(job: Job) -> str:
    """Shell text that runs a checkpointed job again (exit 85 after the walltime warning).

    SLURM requeues the same job id. Grid Engine and PBS submit a follow-up of the same script,
    held until this job has ended; a sweep trial's follow-up carries its index in SPNGD_TRIAL and no
    hold (Grid Engine can only hold on the whole array, PBS not on one subjob), which is safe because
    it is submitted after this trial's checkpoint is complete.
    """
    family = job.profile.scheduler
    if family == "slurm":
        return 'scontrol requeue "$this_job"'
    script = shlex.quote(str(job.script_path))
    group = " ".join(shlex.quote(a) for a in _group_args(job))
    if job.trials:
        after = '-v SPNGD_TRIAL="$trial"'
    else:
        after = '-hold_jid "$this_job"' if family == "sge" else '-W depend=afterany:"$this_job"'
    return " ".join(w for w in ("qsub", group, after, script) if w)


def parse_job_id(family: Family, stdout: str) -> str:
    """``sbatch --parsable`` -> '123' (or '123;cluster'); ``qsub -terse`` -> '123' or '123.1-4:1';
    PBS ``qsub`` -> '123.server' or '123[].server' (PBS ids keep their server part)."""
    text = stdout.strip()
    patterns = {"slurm": r"(\d+)(?:;\S+)?", "sge": r"(\d+)(?:\.\d+-\d+:\d+)?", "pbs": r"(\d+(?:\[\])?\.\S+|\d+)"}
    m = re.fullmatch(patterns[family], text.splitlines()[-1].strip() if text else "")
    if m is None:
        raise UserError(f"submit: cannot find a job id in the scheduler's reply {text!r}")
    return m.group(1)


def submit(job: Job) -> str:
    """Submit the written script with the scheduler's own CLI; returns the job id."""
    argv = submit_argv(job)
    if shutil.which(argv[0]) is None:
        raise UserError(f"submit: {argv[0]} is not on PATH; submit from a login node of {job.profile.name} "
                        "(or use --dry-run to see the script)")
    res = subprocess.run(argv, cwd=job.workdir, capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        reason = (res.stderr.strip() or res.stdout.strip() or f"exit code {res.returncode}").splitlines()[0]
        raise UserError(f"submit: {' '.join(argv[:-1])} refused the job: {reason}")
    return parse_job_id(job.profile.scheduler, res.stdout)
