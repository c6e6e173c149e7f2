#!/usr/bin/env bash
# Submit a training run from a login node with this site's defaults:
#
#   slurm/launch.sh configs/small.yaml --nodes 4 --time 24:00 train.run_dir=/checkpoint/$USER/small \
#       data.train_shards=/shared/data/train tokenizer.text_model=/shared/data/tokenizer/text.model
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
# the mmtrain to run: $MMTRAIN, else `mmtrain` on PATH, else this checkout's .venv/bin/mmtrain, else
# python3 -m mmtrain.cli with this checkout on PYTHONPATH (where python3 has mmtrain's requirements)
repo=$(cd "$here/.." && pwd)
if [ -n "${MMTRAIN:-}" ]; then
    mmtrain=("$MMTRAIN")
elif command -v mmtrain >/dev/null 2>&1; then
    mmtrain=(mmtrain)
elif [ -x "$repo/.venv/bin/mmtrain" ]; then
    mmtrain=("$repo/.venv/bin/mmtrain")
elif PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" python3 -c "import importlib.util as u, sys
sys.exit(not all(u.find_spec(m) for m in ('mmtrain.cli', 'torch', 'deepspeed', 'submitit', 'yaml')))" >/dev/null 2>&1; then
    export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
    mmtrain=(python3 -m mmtrain.cli)
else
    echo "slurm/launch.sh: no mmtrain to run: none on PATH, no $repo/.venv/bin/mmtrain, and python3 cannot import" \
         "mmtrain.cli from $repo with its requirements; install it (make -C $repo install: it sets up $repo/.venv)" \
         "or set MMTRAIN=/path/to/bin/mmtrain" >&2
    exit 127
fi
exec "${mmtrain[@]}" launch "$config" "${args[@]}" "$@"
