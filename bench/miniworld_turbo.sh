#!/usr/bin/env bash
# Retrain the mini-world's Turbo analog alone (every other model kept: the same teacher, judges and metrics), on the
# GPU machine, from the repository root:
#   bash bench/miniworld_turbo.sh --seconds turbo=180 --turbo-pairs 65536   # + any `sb2 miniworld pretrain` option
# It trains into data/miniworld (the committed world) and copies what changed — turbo/, card.json, CARD.md,
# turbo_samples.png — and the log to $OUT/world/, to be committed from there (results/miniworld/TUNING.md has the
# one run so far: 65,536 targets, 180 s — not committed, its students were worse).
set -euo pipefail
OUT=${OUT:-/tmp/miniworld_turbo}
mkdir -p "$OUT/world"
python3 -m sb2 miniworld pretrain --out data/miniworld --workers "$(nproc)" \
  --keep vae --keep tiny_vae --keep clip --keep judges/clip --keep judges --keep teacher "$@" 2>&1 \
  | tee "$OUT/world/pretrain.log"
cp -r data/miniworld/turbo data/miniworld/card.json data/miniworld/CARD.md data/miniworld/turbo_samples.png \
  "$OUT/world/"
