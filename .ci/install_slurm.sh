#!/bin/bash
# Installs what tests/test_slurm.py needs at the OS level: Debian's SLURM daemons and clients, and munge.
# Idempotent: does nothing when everything is there already. Runs as root (CI containers do).
# The test starts its own munged and a two-node cluster from a temporary directory: no /etc changes, no
# services enabled here.
set -euo pipefail

needed=()
for pair in slurmctld:slurmctld slurmd:slurmd munged:munge sbatch:slurm-client; do
    bin=${pair%%:*} pkg=${pair##*:}
    if ! command -v "$bin" >/dev/null 2>&1 && [[ ! -x /usr/sbin/$bin ]]; then
        needed+=("$pkg")
    fi
done
if (( ${#needed[@]} == 0 )); then
    echo "install_slurm: slurmctld, slurmd, munge and the clients are installed"
    exit 0
fi

SUDO=""
[[ $(id -u) -ne 0 ]] && SUDO=sudo
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
# The package scripts try to start the services; in a container without systemd that fails harmlessly, and the
# test starts its own daemons anyway, so keep them from starting at all.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
    $SUDO chmod +x "$policy"
    created_policy=1
fi
$SUDO apt-get install -y --no-install-recommends slurmctld slurmd munge slurm-client
(( created_policy )) && $SUDO rm -f "$policy"
echo "install_slurm: installed ${needed[*]}"
