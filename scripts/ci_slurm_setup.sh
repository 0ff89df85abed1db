#!/usr/bin/env bash
# Install a real SLURM (Debian's slurmctld, slurmd, slurm-client) and munge for the
# `slurm`-marked tests (tests/test_slurm.py). Idempotent: does nothing when the
# programs are already there. Always exits 0: where the install is impossible (not root,
# no apt, no package mirror) the tests skip and print the reason.
set -u

PACKAGES="slurmctld slurmd slurm-client munge"
need=0
for prog in slurmctld slurmd sbatch srun scontrol munged munge; do
    command -v "$prog" >/dev/null 2>&1 || [ -x "/usr/sbin/$prog" ] || need=1
done
command -v ip >/dev/null 2>&1 || [ -x /usr/sbin/ip ] || need=1
command -v nsenter >/dev/null 2>&1 || need=1
if [ "$need" = 0 ]; then
    echo "ci_slurm_setup: slurm and munge already installed"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "ci_slurm_setup: not root, cannot install $PACKAGES; the slurm tests will skip"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "ci_slurm_setup: no apt-get, cannot install $PACKAGES; the slurm tests will skip"
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if ! apt-get update -qq >/dev/null 2>&1; then
    echo "ci_slurm_setup: apt-get update failed; trying the install with the cached lists"
fi
# iproute2 (ip) and util-linux (nsenter, unshare) are usually present; install them if not.
if apt-get install -y -qq --no-install-recommends $PACKAGES iproute2 util-linux >/dev/null 2>&1; then
    echo "ci_slurm_setup: installed $PACKAGES"
else
    echo "ci_slurm_setup: apt-get install of $PACKAGES failed; the slurm tests will skip"
fi
exit 0
