#!/usr/bin/env bash
# Prepared shards (webdataset dir/pattern or an MDS dir) -> a copy with a float16 latent per
# sample (KEY.latent.npy or an MDS 'latent' column), computed by an image tokenizer.
# usage: data_prep/latents.sh SHARDS OUT [TOKENIZER=pixels] [BATCH=64]
set -euo pipefail
shards=${1:?usage: data_prep/latents.sh SHARDS OUT [TOKENIZER] [BATCH]}
out=${2:?usage: data_prep/latents.sh SHARDS OUT [TOKENIZER] [BATCH]}
tokenizer=${3:-pixels}
batch=${4:-64}
mmtrain prep latents "$shards" --out "$out" --tokenizer "$tokenizer" --batch-size "$batch"
