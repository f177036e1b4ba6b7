#!/usr/bin/env bash
# Install Debian's SLURM and munge for tests/test_slurm.py (root, apt-get; about 10 s). Installing starts no
# daemon: the tests start their own two-node cluster on localhost and stop it again.
set -euo pipefail
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
   && command -v munged >/dev/null; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "tests/slurm/install.sh: needs root and apt-get (Debian/Ubuntu) to install slurm; the SLURM tests will be skipped" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
echo "installed: $(dpkg-query -W -f 'slurm-client ${Version}, munge ' slurm-client) $(dpkg-query -W -f '${Version}' munge)"
