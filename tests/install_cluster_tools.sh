#!/usr/bin/env bash
# Install what the cluster tests drive for real (root, apt-get; about 15 s): Debian's SLURM and munge for
# tests/test_slurm.py, and an ssh server and pdsh for the deepspeed launcher's ssh multi-node mode in
# tests/test_launchers.py. Installing starts no daemon: the tests start their own on localhost and stop them.
set -euo pipefail
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
   && command -v munged >/dev/null && command -v pdsh >/dev/null && [ -x /usr/sbin/sshd ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "tests/install_cluster_tools.sh: needs root and apt-get (Debian/Ubuntu); the SLURM and ssh tests will be skipped" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge openssh-server \
    openssh-client pdsh >/dev/null
echo "installed: $(dpkg-query -W -f '${Package} ${Version}  ' slurm-client munge openssh-server pdsh)"
