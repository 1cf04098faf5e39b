#!/usr/bin/env bash
# The main job on the embedded synthetic data: generate videos, train the supervised baseline for a
# few minutes, evaluate it (mIoU, fwIoU, VC8/VC16, offset analysis table + plot), render an overlay mp4;
# then train Accel's fusion on top of it and run the video model with key frames; last, one HTML
# report of both runs side by side (semivss report).
# Every run writes a new folder under runs/ (nothing earlier is overwritten).
set -euo pipefail
export HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1 MPLBACKEND=Agg
DATA=${DATA:-data/synthetic}
RUN=${RUN:-runs/demo-$(date +%Y%m%d-%H%M%S)}

if [ ! -f "$DATA/meta.yaml" ]; then
  semivss data synth "$DATA" --videos 20 --frames 30 --height 128 --width 256 --seed 0
fi
semivss data info "$DATA" --format synthetic --split train
# ITERS (optional) shortens the run; the warm-up (20 iterations) is capped to fit it
semivss train configs/synthetic/supervised.yaml --out "$RUN" --set data.root="$DATA" \
  ${ITERS:+--set schedule.iters=$ITERS --set schedule.warmup_iters=$(( ITERS < 20 ? ITERS : 20 ))}
semivss evaluate "$RUN/checkpoints/best.pt" --data "$DATA" --format synthetic --split val \
  --offsets --label-position 15 --save-stills 4 --out "$RUN/eval-val"
VIDEO=$(head -n 1 "$DATA/val.txt")
semivss predict "$RUN/checkpoints/best.pt" "$DATA/videos/$VIDEO" "$RUN/predict-$VIDEO"
# The video model: Accel on top of that network (reference on every 5th frame, DIS flow in between,
# the same network at half resolution as the update branch; the fusion conv trained on clips).
semivss train configs/synthetic/accel.yaml --out "$RUN/accel" --set data.root="$DATA" \
  --set method.reference="$RUN/model.safetensors" ${ACCEL_ITERS:+--set schedule.iters=$ACCEL_ITERS}
semivss evaluate "$RUN/accel/model.safetensors" --data "$DATA" --format synthetic --split val \
  --save-stills 4 --out "$RUN/accel/eval-val"
semivss predict "$RUN/accel/model.safetensors" "$DATA/videos/$VIDEO" "$RUN/accel/predict-$VIDEO"
# One self-contained HTML page of both runs side by side (the supervised run is the baseline).
semivss report "$RUN" "$RUN/accel" --name supervised --name accel --out "$RUN/report.html"
echo
echo "Results in $RUN:"
echo "  metrics      $RUN/eval-val/metrics.json"
echo "  offsets      $RUN/eval-val/offsets.png (mIoU by distance from the labeled frame)"
echo "  overlay mp4  $RUN/predict-$VIDEO/overlay.mp4"
echo "  Accel        $RUN/accel/eval-val/metrics.json, $RUN/accel/predict-$VIDEO/overlay.mp4"
echo "  logs         $RUN/metrics.csv, tensorboard --logdir $RUN/tb"
echo "  report       $RUN/report.html (open it in a browser)"
