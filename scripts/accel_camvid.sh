#!/usr/bin/env bash
# Accel on camvid-ssvs 1/8 (docs/methods.md#14-accel): the fusion conv trained on frozen branches
# (reference = REFERENCE, a per-frame checkpoint; update = UPDATE, another per-frame checkpoint, or
# by default the reference itself, run at UPDATE_SCALE of the input), then the video-inference
# benchmark on CamVid val (per-frame reference and update vs Accel and vs the reference propagated
# by flow, K = 1, 2, 5, 10; record results/benchmarks/video_inference-camvid-NAME-TAG.json) and the
# offset analysis of the Accel model with K = 5 (mIoU by distance from the labeled frame).
# Usage: REFERENCE=runs/ssl/base-1-8.safetensors NAME=supervised UPDATE_SCALE=0.5 scripts/accel_camvid.sh
#        semivss train configs/camvid-ssvs/update_psp64_1-8.yaml --out runs/accel/camvid-ssvs-1-8-update-psp64
#        REFERENCE=... UPDATE=runs/accel/camvid-ssvs-1-8-update-psp64/model.safetensors TAG=psp64 scripts/accel_camvid.sh
# MIN_INTERVAL=0 adds clips of the labeled frame alone (method.min_interval; tag suffix -k0).
# PROPAGATION=composed and WARP_AT=input benchmark the sharper propagation (record suffix
# -PROPAGATION-WARP_AT). OFFSETS=0 skips the offset analysis. Finished steps are skipped.
set -euo pipefail
export HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1 MPLBACKEND=Agg
REF=${REFERENCE:?set REFERENCE to a per-frame checkpoint}
NAME=${NAME:-supervised}
SCALE=${UPDATE_SCALE:-0.5}
UPDATE=${UPDATE:-}
TAG=${TAG:-u$SCALE}${MIN_INTERVAL:+-k$MIN_INTERVAL}
PROP=${PROPAGATION:-chained}
AT=${WARP_AT:-score}
DATA=${CAMVID:-../shared/data/camvid}
RUNS=${RUNS:-runs/accel}
OUT=$RUNS/camvid-ssvs-1-8-accel-$NAME-$TAG
REC=results/benchmarks/video_inference-camvid-$NAME-$TAG.json
[ "$PROP-$AT" = chained-score ] || REC=${REC%.json}-$PROP-$AT.json

if [ ! -f "$OUT/model.safetensors" ]; then
  resume=(); [ -f "$OUT/checkpoints/last.pt" ] && resume=(--resume)
  semivss train configs/camvid-ssvs/accel_1-8.yaml --out "$OUT" --set data.root="$DATA" \
    --set method.reference="$REF" --set method.update_scale="$SCALE" \
    ${UPDATE:+--set method.update="$UPDATE"} ${MIN_INTERVAL:+--set method.min_interval="$MIN_INTERVAL"} \
    --set name="camvid-ssvs-1-8-accel-$NAME-$TAG" "${resume[@]}"
fi
[ -f "$REC" ] || python benchmarks/video_inference.py "$OUT/model.safetensors" --data "$DATA" \
  --format camvid --split val --intervals 1,2,5,10 --propagation "$PROP" --warp-at "$AT" --out "$REC"
[ "${OFFSETS:-1}" = 0 ] || [ -f "$OUT/eval-offsets/offsets.json" ] || semivss evaluate "$OUT/model.safetensors" --data "$DATA" \
  --format camvid --split val --offsets --label-every 8 --out "$OUT/eval-offsets"
