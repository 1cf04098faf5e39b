#!/usr/bin/env bash
# The camvid-ssvs SSL protocol (docs/protocols.md#5-camvid-ssvs-ssl-protocol): a supervised model
# trained for the standard budget (1000 iterations) is the common start; the control continues
# supervised training from it, and every method is warm-started from it (student, and teacher where
# the method has one, are copies of it), each for ITERS more iterations with the same schedule.
# Every row is evaluated on val (single scale, offsets) and written as a record under RESULTS.
# Usage: scripts/ssl_protocol.sh RATIO [ROW ...]   RATIO: 8 | 16; ROW: control | u2pl | cps | cac |
#        unimatch | ifr | recipe (default: control and every method with a config at that ratio), or
#        the NAME of any configs/camvid-ssvs/NAME_1-RATIO.yaml variant (u2pl_rs8, unimatch_flexmatch).
# The recipe row is the offline teacher-student recipe (docs/methods.md#7) warm-started the same way:
# an OS8 teacher trained 300 iterations from the base, pseudo-labels of every unlabeled training
# frame from the teacher + base ensemble with multi-scale + flip TTA, then the student (a copy of the
# base) trained ITERS iterations on labeled + pseudo-labeled frames with the control's schedule and
# the stricter entropy threshold RECIPE_GAMMA (default 0.5 nats); RECIPE_REP_STRIDE=8 runs the
# student's representation head at stride 8 (model.rep_stride; default 4, the official head).
# RECIPE_KEEP=0.8 replaces the threshold by the lowest-entropy share of each batch
# (method.reliable mode percentile), RECIPE_CLASSWISE=1 takes it per pseudo-labeled class
# (docs/methods.md#11-class-aware-reliability); the row is then named recipe-keepK[-classwise]
# and reuses the teacher and the pseudo-labels of the plain recipe row. RECIPE_ENSEMBLE=a,b,...
# (weights files) labels with the teacher and these models instead of the teacher and the base,
# RECIPE_WEIGHTS their weights (teacher first; default equal); the pseudo-label set and the row
# get the suffix -ensN (N models in all).
# Environment: RUNS (default runs/ssl), CAMVID (CamVid root), ITERS (default 1000), SEED (adds
# --set train.seed=SEED and a -sSEED suffix to the row), RESULTS (default results/camvid-ssvs-1-RATIO),
# OVERRIDES (more --set options for the rows, e.g. for a smoke test), BASE_ONLY=1 (stop after the base),
# POOL=one_per_interval (the image-SSL pool of the IFR paper's Table 1: one unlabeled frame per label
# interval instead of every unlabeled frame, data.split.unlabeled; method rows suffixed -pool1; the
# control has no unlabeled frames and keeps its name; not for the recipe row).
# Finished steps are skipped and an interrupted training resumes from its last.pt. BASE_MODEL
# (a weights file kept outside the repository) skips training the base.
set -euo pipefail
export HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1 MPLBACKEND=Agg
K=${1:?usage: scripts/ssl_protocol.sh 8|16 [ROW ...]}
shift
case "$K" in 8|16) ;; *) echo "label ratio must be 8 or 16, got $K" >&2; exit 2 ;; esac
ROWS=("$@")
CFG=configs/camvid-ssvs
[ ${#ROWS[@]} -gt 0 ] || { ROWS=(control); for m in u2pl cps unimatch ifr cac; do
  [ -f "$CFG/${m}_1-$K.yaml" ] && ROWS+=("$m"); done; }
RUNS=${RUNS:-runs/ssl}
DATA=${CAMVID:-../shared/data/camvid}
ITERS=${ITERS:-1000}
RESULTS=${RESULTS:-results/camvid-ssvs-1-$K}
P=camvid-ssvs-1-$K
BASE=$RUNS/$P-supervised-base
SUFFIX=${SEED:+-s$SEED}
POOL_SUFFIX="" POOL_SET=()
case "${POOL:-all}" in
  all) ;;
  one_per_interval) POOL_SUFFIX=-pool1; POOL_SET=(--set data.split.unlabeled=one_per_interval) ;;
  *) echo "POOL must be all or one_per_interval, got $POOL" >&2; exit 2 ;;
esac
SEED_SET=(); [ -n "${SEED:-}" ] && SEED_SET=(--set train.seed="$SEED")

train() {  # config out_dir [--set ...]: train unless finished, resume if interrupted
  local cfg=$1 out=$2; shift 2
  if [ -f "$out/model.safetensors" ]; then echo "[ssl] $out trained"; return; fi
  local resume=(); [ -f "$out/checkpoints/last.pt" ] && resume=(--resume)
  semivss train "$cfg" --out "$out" --set data.root="$DATA" "$@" "${resume[@]}"
}

evaluate_and_record() {  # out_dir row_name
  local out=$1 row=$2
  [ -f "$out/eval-val/metrics.json" ] || semivss evaluate "$out/model.safetensors" --data "$DATA" \
    --format camvid --split val --offsets --label-every "$K" --out "$out/eval-val"
  [ -f "$RESULTS/$row.json" ] || semivss results add "$out" --name "$row" --protocol "$P-ssl" \
    --out "$RESULTS/$row.json"
}

# 1. the common start: supervised, standard budget (or BASE_MODEL, a saved copy of its weights;
#    every record stores the sha256 of the weights its row started from)
if [ -n "${BASE_MODEL:-}" ]; then
  [ -f "$BASE_MODEL" ] || { echo "BASE_MODEL $BASE_MODEL does not exist" >&2; exit 2; }
else
  train "$CFG/supervised_1-$K.yaml" "$BASE" --set name="$P-supervised-base"
  evaluate_and_record "$BASE" "supervised-base"
  BASE_MODEL=$BASE/model.safetensors
fi

[ -n "${BASE_ONLY:-}" ] && exit 0

recipe_row() {  # the offline recipe, warm-started: teacher, pseudo-label set, student
  local teacher=$RUNS/$P-recipe-teacher$SUFFIX ens="" members=(--ensemble "$BASE_MODEL") weights=2,1
  if [ -n "${RECIPE_ENSEMBLE:-}" ]; then
    local m n=1; members=()
    IFS=, read -r -a list <<< "$RECIPE_ENSEMBLE"
    for m in "${list[@]}"; do
      [ -f "$m" ] || { echo "RECIPE_ENSEMBLE: $m does not exist" >&2; exit 2; }
      members+=(--ensemble "$m"); n=$((n + 1))
    done
    ens=-ens$n weights=${RECIPE_WEIGHTS:-$(printf '1%.0s,' $(seq $n) | sed 's/,$//')}
  fi
  local pseudo=$RUNS/$P-recipe-pseudo$ens$SUFFIX
  local variant=$ens reliable=(--set method.reliable.gamma="${RECIPE_GAMMA:-0.5}")
  if [ -n "${RECIPE_KEEP:-}" ]; then
    variant=$ens-keep$RECIPE_KEEP${RECIPE_CLASSWISE:+-classwise}
    reliable=(--set method.reliable.mode=percentile --set method.reliable.keep="$RECIPE_KEEP"
              --set method.reliable.classwise="$([ -n "${RECIPE_CLASSWISE:-}" ] && echo true || echo false)")
  elif [ -n "${RECIPE_CLASSWISE:-}" ]; then
    echo "RECIPE_CLASSWISE needs RECIPE_KEEP" >&2; exit 2
  fi
  local out=$RUNS/$P-recipe-warm$SUFFIX$variant
  train "$CFG/recipe/teacher.yaml" "$teacher" --set name="$P-recipe-teacher$SUFFIX" \
    --set model.init_from="$BASE_MODEL" --set data.split.k="$K" "${SEED_SET[@]}" ${OVERRIDES:-}
  local pl=(semivss pseudo-label "$teacher/model.safetensors" "${members[@]}" --weights "$weights"
            --scales 0.75,1,1.25,1.5 --flip --data "$DATA" --format camvid --split train
            --label-every "$K" --out "$pseudo")
  if [ -f "$pseudo/manifest.json" ]; then "${pl[@]}" --resume; else "${pl[@]}"; fi
  train "$CFG/recipe/student_self_training.yaml" "$out" \
    --set model.init_from="$BASE_MODEL" --set data.pseudo_labels="$pseudo" --set data.split.k="$K" \
    --set schedule.iters="$ITERS" --set schedule.warmup_iters=0 --set optim.lr=0.01 \
    "${reliable[@]}" --set model.rep_stride="${RECIPE_REP_STRIDE:-4}" \
    --set name="$P-recipe-warm$SUFFIX$variant" "${SEED_SET[@]}" ${OVERRIDES:-}
  evaluate_and_record "$out" "recipe$variant$SUFFIX"
}

# 2. control and warm-started methods
for row in "${ROWS[@]}"; do
  if [ "$row" = recipe ]; then
    [ -z "$POOL_SUFFIX" ] || { echo "POOL applies to the online methods, not the recipe row" >&2; exit 2; }
    recipe_row; continue
  fi
  m=$row; pool=$POOL_SUFFIX pool_set=("${POOL_SET[@]}")
  [ "$row" = control ] && { m=supervised; pool=""; pool_set=(); }
  cfg=$CFG/${m}_1-$K.yaml
  [ -f "$cfg" ] || { echo "no config $cfg for row $row" >&2; exit 2; }
  out=$RUNS/$P-$row-warm$pool$SUFFIX
  extra=(--set name="$P-$row-warm$pool$SUFFIX" --set model.init_from="$BASE_MODEL"
         --set schedule.iters="$ITERS" "${SEED_SET[@]}" "${pool_set[@]}")
  # IFR's loss ramp (docs/methods.md#3-ifr: 4000 of 40k iterations) scaled to the budget
  [ "$m" = ifr ] && extra+=(--set method.ramp_iters=$((ITERS / 10)))
  train "$cfg" "$out" "${extra[@]}" ${OVERRIDES:-}
  evaluate_and_record "$out" "$row$pool$SUFFIX"
done

semivss results table "$RESULTS" --baseline "control$SUFFIX"
