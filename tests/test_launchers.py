"""launch/train.py under every launcher a cluster uses gives the same run: the deepspeed launcher on one node
and as two "nodes" (--no_ssh --node_rank), torchrun, and srun-style tasks that only have SLURM's variables.

The reference is 2 ranks under the deepspeed launcher on one node; every other launch of the same 2 ranks
must export LoRA tensors torch.equal to it and log the same loss at every step.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, assert_same_run, read_metrics, run_train, skip_or_fail, train_env
from trainer.process_env import SLURM_PORT_BASE, expand_tasks_per_node, first_host, free_port, rank_env

STEPS = 4


@pytest.mark.parametrize("nodelist, first", [
    ("localhost", "localhost"), ("n[1-2]", "n1"), ("gpu[007-010,12],cpu1", "gpu007"), ("a,b[1-3]", "a"),
    ("rack[2-3]-n[05-06]", "rack2-n05"), ("x[3,1]", "x3")])
def test_first_host_of_a_slurm_hostlist(nodelist, first):
    assert first_host(nodelist) == first


def test_tasks_per_node_expansion():
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("8") == [8]


def test_srun_task_variables_map_to_torch_rank_variables():
    env = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8",
           "SLURM_STEP_NUM_TASKS": "6", "SLURM_NODEID": "2", "SLURM_STEP_TASKS_PER_NODE": "2(x3)",
           "SLURM_JOB_NODELIST": "localhost,n[2-3]", "SLURM_JOB_ID": "123456"}
    assert rank_env(env) == {"RANK": "5", "WORLD_SIZE": "6", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                             "MASTER_ADDR": "localhost", "MASTER_PORT": str(SLURM_PORT_BASE + 3456)}
    # what the user (or launch/slurm/train.sbatch) exported wins; a launcher's own variables win over SLURM's
    assert rank_env({**env, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"})["MASTER_ADDR"] == "10.0.0.1"
    assert rank_env({**env, "RANK": "0", "WORLD_SIZE": "1"}) == {}
    # each task bound to its own GPU sees one: it is that task's device 0; sharing a node's 8, the 2nd
    assert rank_env(env, visible_gpus=1)["LOCAL_RANK"] == "0"
    assert rank_env(env, visible_gpus=8)["LOCAL_RANK"] == "1"


def spec_overrides(tiny_5b, shards_10, run_dir: Path) -> tuple[str, ...]:
    return (f"model.path={tiny_5b}", f"data.shards={shards_10}", f"run.output_dir={run_dir}",
            f"train.max_steps={STEPS}", "optim.warmup_steps=1", "logging.every_steps=1",
            "checkpoint.every_minutes=null", "lora.dropout=0.1")  # dropout: each rank's RNG matters


def spec_args(tiny_5b, shards_10, run_dir: Path) -> list[str]:
    sets = spec_overrides(tiny_5b, shards_10, run_dir)
    return ["launch/train.py", "--spec", "examples/tiny.yaml", *[a for s in sets for a in ("--set", s)]]


def without_rank_variables() -> dict[str, str]:
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    return {k: v for k, v in train_env().items() if k not in names and not k.startswith("SLURM_")}


def start(cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(procs: list[subprocess.Popen]) -> None:
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for proc, output in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, output[-3000:]


@pytest.fixture(scope="module")
def reference(tiny_5b, shards_10, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("launchers") / "one-node"
    proc = run_train(REPO / "examples" / "tiny.yaml", ranks=2, overrides=spec_overrides(tiny_5b, shards_10, run_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(read_metrics(run_dir)) == STEPS  # so every run equal to it logged each step once
    return run_dir


def no_ssh_nodes(tmp_path: Path, args: list[str], node1_prefix: list[str] = ()) -> list[subprocess.Popen]:
    """Two "nodes" on this machine, one deepspeed launcher and one rank each, as on a cluster without ssh."""
    hostfile = tmp_path / "hostfile"
    # the shipped example with one process per node (under --no_ssh its names only label the nodes)
    hostfile.write_text(re.sub(r"slots=\d+", "slots=1", (REPO / "launch" / "hostfile.example").read_text()))
    launcher, port = Path(sys.executable).with_name("deepspeed"), free_port()
    env = {**without_rank_variables(), "OMP_NUM_THREADS": "1"}  # two "nodes" share this machine's cores
    return [start([*(node1_prefix if node else []), str(launcher), "--hostfile", str(hostfile), "--no_ssh",
                   "--num_nodes", "2", "--node_rank", str(node), "--master_addr", "127.0.0.1",
                   "--master_port", str(port), *args], env) for node in (0, 1)]


@pytest.mark.slow
def test_two_nodes_without_ssh_equal_two_ranks_on_one_node(reference, tiny_5b, shards_10, tmp_path):
    finish(no_ssh_nodes(tmp_path, spec_args(tiny_5b, shards_10, tmp_path / "run")))
    assert_same_run(tmp_path / "run", reference)


@pytest.fixture
def ssh_server(tmp_path):
    """An sshd on a free localhost port that accepts a key made for this test; the client options pdsh needs
    to use it. Needs root (sshd) and pdsh: tests/install_cluster_tools.sh."""
    sshd = shutil.which("sshd", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin"]))
    if os.geteuid() != 0 or not sshd or not shutil.which("pdsh") or not shutil.which("ssh-keygen"):
        skip_or_fail("the ssh multi-node test needs root, sshd, ssh-keygen and pdsh (tests/install_cluster_tools.sh)")
    keys = tmp_path / "ssh"
    keys.mkdir()
    for name in ("host", "user"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / name)], check=True)
    (keys / "authorized_keys").write_bytes((keys / "user.pub").read_bytes())
    port = free_port()
    (keys / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {keys / 'host'}\n"
        f"AuthorizedKeysFile {keys / 'authorized_keys'}\n"
        f"PasswordAuthentication no\nPermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\n"
        f"PidFile {keys / 'sshd.pid'}\n")
    Path("/run/sshd").mkdir(exist_ok=True)  # its privilege separation directory
    subprocess.run([sshd, "-f", str(keys / "sshd_config"), "-E", str(keys / "sshd.log")], check=True)
    client = (f"-i {keys / 'user'} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR "
              f"-o BatchMode=yes")  # the port comes from deepspeed's --ssh_port
    try:
        probe = subprocess.run(["ssh", "-p", str(port), *client.split(), "127.0.0.1", "true"], capture_output=True,
                               text=True, timeout=30)
        assert probe.returncode == 0, f"{probe.stderr}\n{(keys / 'sshd.log').read_text()}"
        yield port, client
    finally:
        os.kill(int((keys / "sshd.pid").read_text()), signal.SIGTERM)


@pytest.mark.slow
def test_two_nodes_over_ssh_with_pdsh_equal_two_ranks_on_one_node(reference, ssh_server, tiny_5b, shards_10,
                                                                  tmp_path):
    """The deepspeed launcher's default multi-node mode: a hostfile, pdsh starting one launcher per host over
    ssh. "localhost" and "127.0.0.1" are two hosts to it; both are this machine."""
    port, client = ssh_server
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    # What the ranks need from this environment goes through the deepspeed_env file (an ssh login has none of it)
    env_file = tmp_path / "deepspeed_env"
    env_file.write_text(f"OMP_NUM_THREADS=1\nTORCH_EXTENSIONS_DIR={train_env()['TORCH_EXTENSIONS_DIR']}\n")
    env = {**without_rank_variables(), "DS_ENV_FILE": str(env_file), "PDSH_SSH_ARGS_APPEND": client}
    launcher = Path(sys.executable).with_name("deepspeed")
    # --no_ssh_check: its probe uses ssh's defaults (~/.ssh), not this test's key
    finish([start([str(launcher), "--hostfile", str(hostfile), "--ssh_port", str(port), "--no_ssh_check",
                   "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                   *spec_args(tiny_5b, shards_10, tmp_path / "run")], env)])
    assert_same_run(tmp_path / "run", reference)


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare (util-linux)")
def test_a_run_directory_that_is_not_shared_between_nodes_is_refused(reference, tiny_5b, shards_10, tmp_path):
    """Node 1 runs in its own mount namespace with an empty tmpfs over the run directory's parent: the
    node-local disk a misconfigured cluster gives each node. Fresh, and resuming a run only node 0 sees."""
    local = tmp_path / "node-local"
    local.mkdir()
    private = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
               'mount -t tmpfs node1-disk "$0" && exec "$@"', str(local)]
    for run_dir, expected in ((local / "fresh", "is not the same directory on every node: rank 1 on"),
                              (local / "resumed", "the ranks see different checkpoints (rank 0 on")):
        if run_dir.name == "resumed":
            shutil.copytree(reference, run_dir)  # a finished 4-step run: node 0 resumes from its last checkpoint
        # the blind rank looks for half the timeout (NFS may be slow to show a new directory): keep it short
        args = [*spec_args(tiny_5b, shards_10, run_dir), "--set", "run.collective_timeout_s=12"]
        nodes = no_ssh_nodes(tmp_path, args, node1_prefix=private)
        outputs = [node.communicate(timeout=300)[0] for node in nodes]
        assert [node.returncode for node in nodes] == [2, 2]
        assert sum(out.count(expected) for out in outputs) == 1, outputs  # said once, by rank 0
        assert "Traceback" not in "".join(outputs)


@pytest.mark.slow
def test_torchrun_equals_the_deepspeed_launcher(reference, tiny_5b, shards_10, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    finish([start([str(torchrun), "--nproc_per_node", "2", "--master_port", str(free_port()),
                   *spec_args(tiny_5b, shards_10, tmp_path / "run")], without_rank_variables())])
    assert_same_run(tmp_path / "run", reference)


def slurm_job_id_with_a_free_port() -> int:
    """srun tasks meet on a port derived from the job id: pick an id whose port is free here."""
    for job_id in range(4000 + os.getpid() % 5000, 10000):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", SLURM_PORT_BASE + job_id))
            except OSError:
                continue
        return job_id
    raise RuntimeError("no free port for the srun-style test")


@pytest.mark.slow
def test_srun_style_tasks_with_only_slurm_variables_train(reference, tiny_5b, shards_10, tmp_path):
    """What srun -N1 -n2 sets in each task, and nothing a launcher would set."""
    job = slurm_job_id_with_a_free_port()
    tasks = [start([sys.executable, *spec_args(tiny_5b, shards_10, tmp_path / "run")], {
        **without_rank_variables(), "SLURM_JOB_ID": str(job), "SLURM_STEP_ID": "0", "SLURM_PROCID": str(task),
        "SLURM_LOCALID": str(task), "SLURM_NODEID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2",
        "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_JOB_NODELIST": "localhost", "SLURM_STEP_NODELIST": "localhost"})
        for task in (0, 1)]
    finish(tasks)
    assert_same_run(tmp_path / "run", reference)
