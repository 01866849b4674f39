#!/usr/bin/env bash
# The demo on real data, Cora (shipped in data/cora): prepare the store -> train BGRL with the
# default settings -> embed every node with the trained encoder and with the same encoder
# untrained (Parquet) -> linear probe of both, and of the raw features, on the public split
# -> report: the accuracies, the training time and one PNG of the run.
# Each command's own output goes to RUN.log beside the run; the progress bar of training shows
# on a terminal. The synthetic scale demo is scripts/demo_scale.sh (make demo-scale).
# DEMO_DATA and DEMO_RUNS move the store and the runs folder; DEMO_TRAIN_FLAGS adds flags to
# `train` (the tests run a short demo with them).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
DATA=${DEMO_DATA:-data/demo-cora}
RUN=${DEMO_RUNS:-runs}/demo-cora-$(date +%Y%m%d-%H%M%S)
LOG=$RUN.log
mkdir -p "$(dirname "$RUN")"
: > "$LOG"
started=$SECONDS

# step TITLE COMMAND...: print the title (if any), run the command with its output in the log
# (stderr too unless SHOW_STDERR=1), then print the command and its wall time; on failure,
# show the end of the log.
step() {
  local title=$1 begun=$SECONDS status=0
  shift
  [ -z "$title" ] || echo "$title"
  echo "\$ bgrl-dgl $*" >> "$LOG"
  if [ "${SHOW_STDERR:-0}" = 1 ]; then
    "$PYTHON" -m bgrl_dgl "$@" >> "$LOG" || status=$?
  else
    "$PYTHON" -m bgrl_dgl "$@" >> "$LOG" 2>&1 || status=$?
  fi
  if [ "$status" != 0 ]; then
    echo "demo: bgrl-dgl $1 failed; the end of $LOG:" >&2
    tail -n 5 "$LOG" >&2
    exit 1
  fi
  local args="$*"
  echo "    bgrl-dgl ${args//$RUN/\$RUN}  ($((SECONDS - begun)) s)"
}

echo "BGRL demo on Cora: 2,708 papers, 5,429 citation links, 1,433-d bag-of-words, 7 classes"
echo "RUN=$RUN"
if [ ! -f "$DATA/meta.json" ]; then
  step "[1/5] prepare the store" prepare planetoid --root data/cora --name cora --out "$DATA"
else
  echo "[1/5] prepare the store: $DATA is ready"
fi
# shellcheck disable=SC2086  # DEMO_TRAIN_FLAGS is a list of flags
SHOW_STDERR=1 step "[2/5] train BGRL with the default settings" train --data "$DATA" --out "$RUN" \
  ${DEMO_TRAIN_FLAGS:-}
echo "[3/5] embed every node into Parquet: the trained encoder, and the same encoder untrained"
for encoder in online random; do
  step "" embed --run "$RUN" --encoder "$encoder" --out "$RUN/embeddings-$encoder"
done
step "[4/5] linear probe on the public split (140 train, 500 valid, 1,000 test)" \
  evaluate --raw-features --run "$RUN"
for encoder in random online; do
  step "" evaluate --embeddings "$RUN/embeddings-$encoder" --run "$RUN"
done
printf '[5/5] report\n    bgrl-dgl report $RUN\n\n'
"$PYTHON" -m bgrl_dgl report "$RUN" 2>> "$LOG" \
  || { echo "demo: report failed; see $LOG" >&2; exit 1; }
echo "demo: $((SECONDS - started)) s in all; every command's output: $LOG"
