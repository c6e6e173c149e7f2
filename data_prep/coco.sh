#!/usr/bin/env bash
# COCO captions 2017 -> webdataset shards: OUT/train2017/train (one sample per image, first
# caption as txt, all captions in json) and OUT/val2017/train (the official val images).
# usage: data_prep/coco.sh COCO_ROOT OUT [RESOLUTION=256] [WORKERS=8]
# COCO_ROOT holds annotations/captions_{train,val}2017.json, train2017/ and val2017/.
set -euo pipefail
root=${1:?usage: data_prep/coco.sh COCO_ROOT OUT [RESOLUTION] [WORKERS]}
out=${2:?usage: data_prep/coco.sh COCO_ROOT OUT [RESOLUTION] [WORKERS]}
res=${3:-256}
workers=${4:-8}
for split in train2017 val2017; do
  mmtrain prep coco "$root/annotations/captions_$split.json" --images "$root/$split" \
    --out "$out/$split" --resolution "$res" --workers "$workers"
done
