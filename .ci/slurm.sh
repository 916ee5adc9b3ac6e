#!/usr/bin/env bash
# A throwaway single-node Slurm (Debian's slurm-wlm + munge) for testing the Slurm profile.
#   .ci/slurm.sh up DIR     install if needed, start munged, slurmctld and slurmd; wait for an idle node
#   .ci/slurm.sh down DIR   stop the three daemons by their PID files, remove /etc/slurm/slurm.conf
# Runs as root. Everything lives in DIR except /etc/slurm/slurm.conf, a symlink: the plugin's job step
# strips every SLURM_* variable, so SLURM_CONF alone does not reach commands inside jobs.
# Accounting is off: run Snakemake with --slurm-status-command squeue (sacct would hang without error).
set -euo pipefail
cmd=${1:?usage: slurm.sh up|down DIR}
dir=$(realpath -m "${2:?usage: slurm.sh up|down DIR}")
conf=/etc/slurm/slurm.conf

down() {
    for pid in "$dir"/slurmd.pid "$dir"/slurmctld.pid "$dir"/munged.pid; do
        [[ -f $pid ]] && kill "$(cat "$pid")" 2>/dev/null || true
    done
    sleep 1
    if [[ -L $conf && $(readlink "$conf") == "$dir/slurm.conf" ]]; then rm -f "$conf"; fi
}

if [[ $cmd == down ]]; then down; exit 0; fi
[[ $cmd == up ]] || { echo "usage: slurm.sh up|down DIR" >&2; exit 2; }
[[ $(id -u) == 0 ]] || { echo "slurm.sh: needs root (it runs slurmctld/slurmd as root)" >&2; exit 1; }
if [[ -e $conf && ! -L $conf ]]; then
    echo "slurm.sh: $conf exists and is not ours; refusing to replace a real Slurm config" >&2; exit 1
fi

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null || ! command -v sinfo >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi

mkdir -p "$dir"/munge "$dir"/state "$dir"/spool /etc/slurm
chmod 755 "$dir" "$dir"/munge
[[ -f $dir/munge.key ]] || mungekey -c -k "$dir/munge.key"
chmod 600 "$dir/munge.key"
munged --key-file="$dir/munge.key" --socket="$dir/munge/munge.socket.2" --pid-file="$dir/munged.pid" \
    --log-file="$dir/munged.log" --seed-file="$dir/munged.seed" --force

host=$(hostname -s)
mem=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.85}' /proc/meminfo)
cat > "$dir/slurm.conf" <<EOF
ClusterName=dmrci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket.2
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
MinJobAge=300
MailProg=/bin/true
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
NodeName=$host NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES State=UP MaxTime=INFINITE
EOF
ln -sfn "$dir/slurm.conf" "$conf"
slurmctld
slurmd
for _ in $(seq 60); do
    if sinfo -h -o %t 2>/dev/null | grep -qx idle; then sinfo; exit 0; fi
    sleep 1
done
echo "slurm.sh: the node did not become idle; logs in $dir" >&2
sinfo >&2 || true
down
exit 1
