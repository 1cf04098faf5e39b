#!/usr/bin/env bash
# One results table for the semi-supervised methods (issue 4): supervised, IFR, U2PL, CPS and
# UniMatch trained with the same backbone, crops, labeled frames and iteration budget, each
# evaluated on the val split (final weights), with its training time per iteration relative to
# the supervised run (median of the logged it/s windows of each run).
# Usage: scripts/methods_table.sh camvid | synthetic [METHOD ...]   (default: all five)
# Environment: ITERS (iteration budget, default 500), RUNS (output folder, default runs),
# CAMVID (CamVid root) or DATA (synthetic set), OVERRIDES (more --set options for every training,
# e.g. "--set schedule.warmup_iters=0" for a 2-iteration smoke test). Runs are <RUNS>/<protocol>-<method>-<ITERS>it;
# finished steps are skipped and an interrupted training resumes from its last.pt, so the table
# can be filled over several sessions.
set -euo pipefail
export HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1 MPLBACKEND=Agg
PROTO=${1:?usage: scripts/methods_table.sh camvid|synthetic [METHOD ...]}
shift
METHODS=("$@")
[ ${#METHODS[@]} -gt 0 ] || METHODS=(supervised ifr u2pl cps unimatch)
ITERS=${ITERS:-500}
RUNS=${RUNS:-runs}
case "$PROTO" in
  camvid)
    DATA=${CAMVID:-../shared/data/camvid}; FMT=camvid; P=camvid-ssvs-1-8; SUFFIX=_1-8
    CFG=configs/camvid-ssvs; EVAL=(--offsets --label-every 8)
    ;;
  synthetic)
    DATA=${DATA:-data/synthetic}; FMT=synthetic; P=synthetic; SUFFIX=
    CFG=configs/synthetic; EVAL=()
    [ -f "$DATA/meta.yaml" ] || semivss data synth "$DATA" --videos 20 --frames 30 --height 128 --width 256 --seed 0
    ;;
  *) echo "unknown protocol $PROTO (camvid | synthetic)" >&2; exit 2 ;;
esac

for m in "${METHODS[@]}"; do
  cfg=$CFG/$m$SUFFIX.yaml
  [ -f "$cfg" ] || { echo "no config $cfg for method $m" >&2; exit 2; }
  out=$RUNS/$P-$m-${ITERS}it
  extra=()
  # IFR's loss ramp (docs/methods.md#3-ifr: 4000 of 40k iterations) scaled to the budget, as every config does
  [ "$m" = ifr ] && extra=(--set method.ramp_iters=$((ITERS / 10)))
  if [ ! -f "$out/model.safetensors" ]; then
    resume=(); [ -f "$out/checkpoints/last.pt" ] && resume=(--resume)
    semivss train "$cfg" --out "$out" --set name="$P-$m-${ITERS}it" --set data.root="$DATA" \
      --set schedule.iters="$ITERS" ${OVERRIDES:-} "${extra[@]}" "${resume[@]}"
  fi
  [ -f "$out/eval-val/metrics.json" ] || semivss evaluate "$out/model.safetensors" --data "$DATA" \
    --format "$FMT" --split val "${EVAL[@]}" --out "$out/eval-val"
done

# the table: supervised first (the 1.00x row) whenever its run exists
rows=() names=()
if [ -f "$RUNS/$P-supervised-${ITERS}it/eval-val/metrics.json" ]; then
  rows+=("$RUNS/$P-supervised-${ITERS}it/eval-val") names+=(--name supervised)
fi
for m in "${METHODS[@]}"; do
  [ "$m" = supervised ] && continue
  rows+=("$RUNS/$P-$m-${ITERS}it/eval-val") names+=(--name "$m")
done
semivss compare "${rows[@]}" "${names[@]}"
