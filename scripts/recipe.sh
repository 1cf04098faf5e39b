#!/usr/bin/env bash
# The offline teacher-student recipe (SPEC 2.5, PVUW 2024) end to end:
#   1. train the teacher and 2. the student on the labeled frames,
#   3. pseudo-label every unlabeled frame with a TTA (multi-scale + flip) teacher+student ensemble,
#   4. fine-tune the student on labeled + pseudo-labeled frames (reliable CE + contrastive loss),
#   5. evaluate each stage: student alone, + self-training, + TTA, + ensemble with the teacher.
# Usage: scripts/recipe.sh synthetic | camvid     (RUNS=runs by default; steps whose outputs
# exist are skipped, so an interrupted recipe continues where it stopped).
set -euo pipefail
export HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1 MPLBACKEND=Agg
PROTO=${1:?usage: scripts/recipe.sh synthetic|camvid}
case "$PROTO" in
  synthetic)
    DATA=data/synthetic; FMT=synthetic; RULE=(--label-position 15); P=synthetic
    CFG=configs/synthetic; STUDENT_CFG=$CFG/supervised.yaml; SCALES=0.75,1,1.25
    TEACHER=runs/synthetic-teacher; STUDENT=runs/synthetic-supervised
    PSEUDO=runs/synthetic-pseudo; FINAL=runs/synthetic-student-self-training
    [ -f "$DATA/meta.yaml" ] || semivss data synth "$DATA" --videos 20 --frames 30 --height 128 --width 256 --seed 0
    ;;
  camvid)
    DATA=${CAMVID:-../shared/data/camvid}; FMT=camvid; RULE=(--label-every 8); P=camvid-ssvs
    CFG=configs/camvid-ssvs; STUDENT_CFG=$CFG/supervised_1-8.yaml; SCALES=0.75,1,1.25,1.5
    TEACHER=runs/camvid-ssvs-1-8-teacher; STUDENT=runs/camvid-ssvs-1-8-supervised
    PSEUDO=runs/camvid-ssvs-1-8-pseudo; FINAL=runs/camvid-ssvs-1-8-student-self-training
    ;;
  *) echo "unknown protocol $PROTO (synthetic | camvid)" >&2; exit 2 ;;
esac

train() {  # config out_dir: train unless finished, resume if interrupted
  if [ -f "$2/model.safetensors" ]; then echo "[recipe] $2 done"; return; fi
  if [ -f "$2/checkpoints/last.pt" ]; then semivss train "$1" --out "$2" --resume
  else semivss train "$1" --out "$2"; fi
}
train "$CFG/recipe/teacher.yaml" "$TEACHER"
train "$STUDENT_CFG" "$STUDENT"
PL=(semivss pseudo-label "$TEACHER/model.safetensors" --ensemble "$STUDENT/model.safetensors"
    --weights 2,1 --scales "$SCALES" --flip --data "$DATA" --format "$FMT" --split train
    "${RULE[@]}" --out "$PSEUDO")
if [ -f "$PSEUDO/manifest.json" ]; then "${PL[@]}" --resume; else "${PL[@]}"; fi
train "$CFG/recipe/student_self_training.yaml" "$FINAL"

evaluate() {  # name checkpoint [options]: val metrics into $FINAL/stages/<name>
  local name=$1 ckpt=$2; shift 2
  [ -f "$FINAL/stages/$name/metrics.json" ] && return
  semivss evaluate "$ckpt" --data "$DATA" --format "$FMT" --split val --out "$FINAL/stages/$name" "$@"
}
evaluate teacher "$TEACHER/model.safetensors"
evaluate student "$STUDENT/model.safetensors"
evaluate student+self-training "$FINAL/model.safetensors"
evaluate student+self-training+tta "$FINAL/model.safetensors" --scales "$SCALES" --flip
evaluate student+self-training+tta+ensemble "$FINAL/model.safetensors" \
  --ensemble "$TEACHER/model.safetensors" --weights 1,1 --scales "$SCALES" --flip
python - "$FINAL/stages" <<'PY'
import json, sys
from pathlib import Path
rows = []
for name in ["teacher", "student", "student+self-training", "student+self-training+tta",
             "student+self-training+tta+ensemble"]:
    m = json.loads((Path(sys.argv[1]) / name / "metrics.json").read_text())["metrics"]
    rows.append(f"| {name} | {100 * m['mIoU']:.2f} | {100 * m['VC8']:.2f} | {100 * m['VC16']:.2f} |")
print("| stage | val mIoU | VC8 | VC16 |\n|---|---|---|---|\n" + "\n".join(rows))
PY
