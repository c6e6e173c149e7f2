#!/usr/bin/env bash
# A CSV / TSV / JSONL / JSON / parquet table with columns image, caption (and optional label)
# -> OUT/train, OUT/val webdataset shards. Relative image paths resolve against the table's folder.
# usage: data_prep/manifest.sh TABLE OUT [RESOLUTION=256] [WORKERS=8]
# Other column names: add e.g. --image-column path --caption-column text (see README.md).
set -euo pipefail
table=${1:?usage: data_prep/manifest.sh TABLE OUT [RESOLUTION] [WORKERS]}
out=${2:?usage: data_prep/manifest.sh TABLE OUT [RESOLUTION] [WORKERS]}
res=${3:-256}
workers=${4:-8}
mmtrain prep manifest "$table" --out "$out" --resolution "$res" --val-fraction 0.01 --workers "$workers"
