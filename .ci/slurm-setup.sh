#!/usr/bin/env bash
# CI install step for the Slurm tests (tests/test_slurm_cluster.py).
# Installs Debian's Slurm + munge packages. It does NOT start any daemon: the test
# harness (tests/slurm_cluster.py) starts munged/slurmctld/slurmd itself into a temp
# dir and stops them by pid. Safe to run twice. Needs root and apt (Debian 12).
set -euo pipefail

if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
   && command -v sbatch >/dev/null && command -v munged >/dev/null; then
  echo "slurm-setup: slurm and munge already installed"
else
  export DEBIAN_FRONTEND=noninteractive
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  # policy-rc.d: never let the package scripts try to start services
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod +x /usr/sbin/policy-rc.d
    trap '$SUDO rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge
fi

# The package normally creates the key; make sure it exists with the right owner.
if [ ! -s /etc/munge/munge.key ]; then
  SUDO=""; if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  $SUDO install -d -o munge -g munge -m 700 /etc/munge
  $SUDO dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  $SUDO chown munge:munge /etc/munge/munge.key
  $SUDO chmod 400 /etc/munge/munge.key
fi
slurmctld -V
