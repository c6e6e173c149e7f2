#!/usr/bin/env bash
# Write the embedded synthetic dataset and its text tokenizer.
# usage: data_prep/synthetic.sh OUT [NUM_TRAIN=6000] [NUM_VAL=256]
set -euo pipefail
out=${1:?usage: data_prep/synthetic.sh OUT [NUM_TRAIN] [NUM_VAL]}
num_train=${2:-6000}
num_val=${3:-256}
mmtrain prep synthetic --out "$out/train" --num "$num_train" --seed 0
mmtrain prep synthetic --out "$out/val" --num "$num_val" --seed 1
mmtrain tokenizer train --shards "$out/train" --out "$out/tokenizer/text"
