#!/bin/bash
# Which GSC components hold back new classes? Step 1 of the demo recipe on the synthetic scenes
# (tiny model, base: sky, grass, water, sand, disk, box; new: triangle, ring), once per variant,
# against MiB and PLOP from the same step-0 model. One thread per run; about 25 minutes in all.
#   bash benchmarks/gsc_plasticity.sh OUT_DIR     (then: cat OUT_DIR/results.txt)
set -euo pipefail
OUT=${1:?usage: gsc_plasticity.sh OUT_DIR}
CISS=${CISS:-.venv/bin/ciss}
export OMP_NUM_THREADS=1
mkdir -p "$OUT"
cat > "$OUT/config.toml" <<'T'
seed = 0
[train]
epochs = 30
lr = 0.05
epochs_next = 15
lr_next = 0.05
clip_grad_norm = 3.0
T
[ -d "$OUT/base/step-0" ] || $CISS learn --run "$OUT/base" --classes sky,grass,water,sand,disk,box --method ft \
    --config "$OUT/config.toml" > "$OUT/base.log" 2>&1
ALL_OFF="--no gsc.compensation --no gsc.soft --no gsc.sharp --no gsc.relation --no gsc.pseudo --no gsc.pod"
: > "$OUT/results.txt"
while IFS='|' read -r name flags; do
    rm -rf "${OUT:?}/$name"
    cp -r "$OUT/base" "$OUT/$name"
    # shellcheck disable=SC2086
    $CISS learn --run "$OUT/$name" --new-classes triangle,ring $flags --config "$OUT/config.toml" > "$OUT/$name.log" 2>&1
    echo "$name ($flags): $(grep -h 'mIoU old' "$OUT/$name.log" | tail -1 | sed 's/.*mIoU/mIoU/')" | tee -a "$OUT/results.txt"
done <<V
mib|--method mib
plop|--method plop
gsc|--method gsc
gsc-no-pod|--method gsc --no gsc.pod
gsc-no-relation|--method gsc --no gsc.relation
gsc-no-pseudo|--method gsc --no gsc.pseudo
gsc-no-compensation|--method gsc --no gsc.compensation
gsc-no-soft|--method gsc --no gsc.soft
gsc-no-sharp|--method gsc --no gsc.sharp
gsc-no-adaptive_factor|--method gsc --no gsc.adaptive_factor
gsc-ce-only|--method gsc $ALL_OFF
gsc-no-pod-no-adaptive_factor|--method gsc --no gsc.pod --no gsc.adaptive_factor
gsc-no-pod-no-relation|--method gsc --no gsc.pod --no gsc.relation
gsc-demo|--method gsc --no gsc.pod --no gsc.relation --no gsc.adaptive_factor
idec|--method idec
V
