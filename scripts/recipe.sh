#!/usr/bin/env bash
# The offline teacher-student recipe (docs/methods.md#7-offline-teacher-student-self-training, PVUW 2024) end to end:
#   1. train the student and 2. the teacher on the labeled frames (the camvid teacher starts from
#      the trained student),
#   3. pseudo-label every unlabeled frame with a TTA (multi-scale + flip) teacher+student ensemble,
#   4. fine-tune the student on labeled + pseudo-labeled frames (reliable CE + contrastive loss),
#   5. evaluate each stage: student alone, + self-training, + TTA, + ensemble with the teacher
#      (and the student with TTA but without self-training, to separate the two).
# Usage: scripts/recipe.sh synthetic | camvid     (steps whose outputs exist are skipped, so an
# interrupted recipe continues where it stopped). Environment: RUNS (output folder, default runs),
# ITERS (override every training's iteration count, for a smoke test), DATA (synthetic set) or
# CAMVID (CamVid root).
set -euo pipefail
export HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1 MPLBACKEND=Agg
PROTO=${1:?usage: scripts/recipe.sh synthetic|camvid}
RUNS=${RUNS:-runs}
SET=(${ITERS:+--set schedule.iters=$ITERS --set schedule.warmup_iters=0 --set train.eval_interval=0})
case "$PROTO" in
  synthetic)
    DATA=${DATA:-data/synthetic}; FMT=synthetic; RULE=(--label-position 15); P=synthetic
    CFG=configs/synthetic; STUDENT_CFG=$CFG/supervised.yaml; SCALES=0.75,1,1.25
    TEACHER=$RUNS/synthetic-teacher; STUDENT=$RUNS/synthetic-supervised
    PSEUDO=$RUNS/synthetic-pseudo; FINAL=$RUNS/synthetic-student-self-training
    [ -f "$DATA/meta.yaml" ] || semivss data synth "$DATA" --videos 20 --frames 30 --height 128 --width 256 --seed 0
    ;;
  camvid)
    DATA=${CAMVID:-../shared/data/camvid}; FMT=camvid; RULE=(--label-every 8); P=camvid-ssvs
    CFG=configs/camvid-ssvs; STUDENT_CFG=$CFG/supervised_1-8.yaml; SCALES=0.75,1,1.25,1.5
    TEACHER=$RUNS/camvid-ssvs-1-8-teacher; STUDENT=$RUNS/camvid-ssvs-1-8-supervised
    PSEUDO=$RUNS/camvid-ssvs-1-8-pseudo; FINAL=$RUNS/camvid-ssvs-1-8-student-self-training
    ;;
  *) echo "unknown protocol $PROTO (synthetic | camvid)" >&2; exit 2 ;;
esac

train() {  # config out_dir [--set ...]: train unless finished, resume if interrupted
  local cfg=$1 out=$2; shift 2
  if [ -f "$out/model.safetensors" ]; then echo "[recipe] $out done"; return; fi
  local resume=(); [ -f "$out/checkpoints/last.pt" ] && resume=(--resume)
  semivss train "$cfg" --out "$out" --set data.root="$DATA" "${SET[@]}" "$@" "${resume[@]}"
}
train "$STUDENT_CFG" "$STUDENT"
train "$CFG/recipe/teacher.yaml" "$TEACHER"
PL=(semivss pseudo-label "$TEACHER/model.safetensors" --ensemble "$STUDENT/model.safetensors"
    --weights 2,1 --scales "$SCALES" --flip --data "$DATA" --format "$FMT" --split train
    "${RULE[@]}" --out "$PSEUDO")
if [ -f "$PSEUDO/manifest.json" ]; then "${PL[@]}" --resume; else "${PL[@]}"; fi
train "$CFG/recipe/student_self_training.yaml" "$FINAL" \
  --set model.init_from="$STUDENT/model.safetensors" --set data.pseudo_labels="$PSEUDO"

evaluate() {  # name checkpoint [options]: val metrics into $FINAL/stages/<name>
  local name=$1 ckpt=$2; shift 2
  [ -f "$FINAL/stages/$name/metrics.json" ] && return
  semivss evaluate "$ckpt" --data "$DATA" --format "$FMT" --split val --out "$FINAL/stages/$name" "$@"
}
evaluate teacher "$TEACHER/model.safetensors"
evaluate student "$STUDENT/model.safetensors"
evaluate student+tta "$STUDENT/model.safetensors" --scales "$SCALES" --flip  # TTA without self-training
evaluate student+self-training "$FINAL/model.safetensors"
evaluate student+self-training+tta "$FINAL/model.safetensors" --scales "$SCALES" --flip
evaluate student+self-training+tta+ensemble "$FINAL/model.safetensors" \
  --ensemble "$TEACHER/model.safetensors" --weights 1,1 --scales "$SCALES" --flip
S=$FINAL/stages
semivss compare "$S/teacher" "$S/student" "$S/student+tta" "$S/student+self-training" \
  "$S/student+self-training+tta" "$S/student+self-training+tta+ensemble" \
  --name teacher --name student --name student+tta --name student+self-training \
  --name student+self-training+tta --name student+self-training+tta+ensemble --no-speed
