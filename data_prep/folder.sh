#!/usr/bin/env bash
# A folder of images with same-named .txt captions -> OUT/train, OUT/val webdataset shards.
# usage: data_prep/folder.sh IMAGES OUT [RESOLUTION=256] [WORKERS=8]
# Re-running the same command resumes: finished shards are skipped.
set -euo pipefail
images=${1:?usage: data_prep/folder.sh IMAGES OUT [RESOLUTION] [WORKERS]}
out=${2:?usage: data_prep/folder.sh IMAGES OUT [RESOLUTION] [WORKERS]}
res=${3:-256}
workers=${4:-8}
mmtrain prep folder "$images" --out "$out" --resolution "$res" --min-size "$((res / 2))" \
  --max-aspect 3 --val-fraction 0.01 --workers "$workers"
