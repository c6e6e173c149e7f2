#!/usr/bin/env bash
# Submit a training run from a login node with this site's defaults:
#
#   slurm/launch.sh configs/small.yaml --nodes 4 --time 24:00 train.run_dir=/checkpoint/$USER/small
#
# Site defaults (partition, account, qos, GPUs per node, the venv to activate on the
# compute nodes) come from slurm/site.env, or the file named by MMTRAIN_SITE; copy
# slurm/site.env.example. Flags given on the command line win over the site's.
# Add --dry-run to print the sbatch script instead of submitting it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
site=${MMTRAIN_SITE:-$here/site.env}
if [ -f "$site" ]; then
    # shellcheck source=/dev/null
    source "$site"
fi
config=${1:?usage: slurm/launch.sh CONFIG [mmtrain launch flags] [key=value ...]}
shift
args=(--cluster slurm)
[ -n "${PARTITION:-}" ] && args+=(--partition "$PARTITION")
[ -n "${ACCOUNT:-}" ] && args+=(--account "$ACCOUNT")
[ -n "${QOS:-}" ] && args+=(--qos "$QOS")
[ -n "${GPUS_PER_NODE:-}" ] && args+=(--gpus-per-node "$GPUS_PER_NODE")
[ -n "${CPUS_PER_TASK:-}" ] && args+=(--cpus-per-task "$CPUS_PER_TASK")
[ -n "${VENV:-}" ] && args+=("launch.setup=[\"source $VENV/bin/activate\"]")
exec "${MMTRAIN:-mmtrain}" launch "$config" "${args[@]}" "$@"
