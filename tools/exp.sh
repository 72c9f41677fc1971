#!/usr/bin/env bash
# An experiment from the committed params.yaml plus the changes given, never the previous run's leftovers:
#   tools/exp.sh train.lr=0.1 train.epochs=3      (make exp S="train.lr=0.1 train.epochs=3")
# `dvc exp run -S` edits the workspace params.yaml, which still holds every key the previous experiment set;
# this starts from the last commit's file instead. Uncommitted edits are kept as params.yaml.before-exp.
set -euo pipefail
DVC=${DVC:-dvc}
if ! git diff --quiet HEAD -- params.yaml; then
  cp params.yaml params.yaml.before-exp
  echo "exp: params.yaml differed from the last commit; your version is saved as params.yaml.before-exp"
fi
git checkout HEAD -- params.yaml
args=()
for change in "$@"; do args+=(-S "$change"); done
exec "$DVC" exp run "${args[@]}"
