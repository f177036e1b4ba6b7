"""A real SLURM cluster on this machine for the tests: slurmctld plus two slurmd daemons playing the nodes n1
and n2 (one CPU each), all on localhost with their own ports, state under a temporary directory. Jobs run as
the user who submits them, with the submitter's environment (sbatch's default --export=ALL).

JobRequeue=0: a job is requeued only if it asked for it (#SBATCH --requeue), so the tests see that line work.
Needs Debian's slurmctld, slurmd, slurm-client and munge (tests/install_cluster_tools.sh) and root, as the daemons do.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from trainer.process_env import free_port

PROGRAMS = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel", "sinfo", "munged", "munge")
SEARCH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def unavailable() -> str | None:
    """Why a cluster cannot be started here, or None."""
    missing = [p for p in PROGRAMS if shutil.which(p, path=SEARCH) is None]
    if missing:
        return f"SLURM is not installed (missing {', '.join(missing)}): run tests/install_cluster_tools.sh as root"
    if os.geteuid() != 0:
        return "the SLURM daemons need root"
    return None


CONF = """\
ClusterName=trainertest
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort={ctld_port}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmdTimeout=300
InactiveLimit=0
KillWait=5
MinJobAge=300
Waittime=0
JobRequeue=0
NodeName=n1 NodeHostname={host} NodeAddr=127.0.0.1 Port={n1_port} CPUs=1 RealMemory={memory_mb}
NodeName=n2 NodeHostname={host} NodeAddr=127.0.0.1 Port={n2_port} CPUs=1 RealMemory={memory_mb}
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class Cluster:
    root: Path
    env: dict[str, str]  # SLURM_CONF pointing at this cluster, and the programs on PATH
    started_munged: bool

    def run(self, *cmd: str, check: bool = True) -> str:
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr}")
        return proc.stdout

    def job_state(self, job_id: str) -> dict[str, str]:
        fields = self.run("scontrol", "show", "job", "-o", job_id).split()
        return dict(f.split("=", 1) for f in fields if "=" in f)

    def wait_for(self, what: str, condition, timeout: float, poll: float = 0.2):
        deadline = time.monotonic() + timeout
        while (value := condition()) is None or value is False:
            if time.monotonic() > deadline:
                raise TimeoutError(f"SLURM test cluster: {what} did not happen within {timeout:.0f} s; "
                                   f"logs in {self.root / 'log'}")
            time.sleep(poll)
        return value

    def log_tail(self) -> str:
        return "\n".join(p.read_text()[-2000:] for p in sorted((self.root / "log").glob("*.log")))


def munge_works(env: dict[str, str]) -> bool:
    munge = subprocess.run(["munge", "-n"], env=env, capture_output=True)
    return munge.returncode == 0 and subprocess.run(["unmunge"], input=munge.stdout, env=env,
                                                    capture_output=True).returncode == 0


def start_munged(env: dict[str, str]) -> bool:
    """Use a running munged, else start one (returns whether we did)."""
    if munge_works(env):
        return False
    if not Path("/etc/munge/munge.key").is_file() or Path("/etc/munge/munge.key").stat().st_size == 0:
        subprocess.run(["mungekey", "-c"], env=env, check=True)
    subprocess.run(["install", "-d", "-o", "munge", "-g", "munge", "-m", "0755", "/run/munge"], check=True)
    subprocess.run(["runuser", "-u", "munge", "--", shutil.which("munged", path=SEARCH)], env=env, check=True)
    if not munge_works(env):
        raise RuntimeError("munged started but munge -n | unmunge fails")
    return True


def start(root: Path) -> Cluster:
    for sub in ("state", "spool", "log"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    conf = root / "slurm.conf"
    conf.write_text(CONF.format(root=root, ctld_port=free_port(), n1_port=free_port(), n2_port=free_port(),
                                host=socket.gethostname().split(".")[0],
                                memory_mb=min(8000, psutil.virtual_memory().total // 2**20 // 3)))
    env = dict(os.environ, SLURM_CONF=str(conf), PATH=SEARCH)
    cluster = Cluster(root, env, start_munged(env))
    try:
        cluster.run("slurmctld", "-c", "-f", str(conf))  # daemonizes; -c: no state from an earlier cluster
        for node in ("n1", "n2"):
            cluster.run("slurmd", "-N", node, "-f", str(conf))
        cluster.wait_for("both nodes idle", lambda: cluster.run("sinfo", "-h", "-o", "%T", check=False).split()
                         == ["idle"], timeout=60)
    except BaseException:
        stop(cluster)
        raise
    return cluster


def stop(cluster: Cluster) -> None:
    """Cancel what is left, then stop the daemons by their pid files (never by name: a real SLURM may run)."""
    cluster.run("scancel", "--partition=debug", check=False)
    pids = [cluster.root / "slurmd-n1.pid", cluster.root / "slurmd-n2.pid", cluster.root / "slurmctld.pid"]
    if cluster.started_munged:
        pids.append(Path("/run/munge/munged.pid"))
    procs = []
    for pid_file in pids:
        if pid_file.is_file() and re.fullmatch(r"\d+\s*", pid_file.read_text()):
            try:
                proc = psutil.Process(int(pid_file.read_text()))
                proc.send_signal(signal.SIGTERM)
                procs.append(proc)
            except psutil.NoSuchProcess:
                pass
    _, alive = psutil.wait_procs(procs, timeout=20)
    for proc in alive:
        proc.kill()
