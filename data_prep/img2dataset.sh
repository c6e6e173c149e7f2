#!/usr/bin/env bash
# img2dataset (or any webdataset) tar shards -> re-sharded, filtered, resized shards in
# OUT/train and OUT/val. SHARDS: a directory of .tar files, one .tar, or a brace pattern.
# usage: data_prep/img2dataset.sh SHARDS OUT [RESOLUTION=256] [WORKERS=8]
set -euo pipefail
shards=${1:?usage: data_prep/img2dataset.sh SHARDS OUT [RESOLUTION] [WORKERS]}
out=${2:?usage: data_prep/img2dataset.sh SHARDS OUT [RESOLUTION] [WORKERS]}
res=${3:-256}
workers=${4:-8}
mmtrain prep wds "$shards" --out "$out" --resolution "$res" --min-size "$res" --max-aspect 2 \
  --min-caption-words 3 --val-fraction 0.005 --workers "$workers"
