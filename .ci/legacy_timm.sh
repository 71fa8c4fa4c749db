#!/usr/bin/env bash
# Legacy-timm pass: run the model and training tests again with the oldest timm that 1.5_requirements.txt /
# 1.8_requirements.txt pin, on the current torch. That timm is installed without dependencies into its own folder
# (never into the venv) and put first on PYTHONPATH; the run fails if another timm is what gets imported.
#
#   bash .ci/legacy_timm.sh [extra pytest args]       env: TIMM_VERSION, PYTHON, LEGACY_TIMM_DIR
set -euo pipefail
cd "$(dirname "$0")/.."

TIMM_VERSION="${TIMM_VERSION:-0.4.12}"
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
TARGET="${LEGACY_TIMM_DIR:-${TMPDIR:-/tmp}/legacy-timm-$TIMM_VERSION}"

if ! grep -qs "'$TIMM_VERSION'" "$TARGET/timm/version.py"; then
    rm -rf "$TARGET"
    "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps --target "$TARGET" "timm==$TIMM_VERSION"
fi
export PYTHONPATH="$TARGET${PYTHONPATH:+:$PYTHONPATH}"

"$PYTHON" -c "
import timm, torch
assert timm.__version__ == '$TIMM_VERSION', f'expected timm $TIMM_VERSION, imported {timm.__version__} from {timm.__file__}'
print(f'legacy-timm pass: timm {timm.__version__} ({timm.__file__}) on torch {torch.__version__}')
"

# The model tests, the training tests, and the unit tests of the compatibility layer itself. A listed file that
# does not exist stops the run (a renamed test file must not drop out of the pass unnoticed).
tests=(tests/test_model.py tests/test_train.py tests/test_timm_compat.py tests/test_train_resume_files.py)
for f in "${tests[@]}"; do
    [ -f "$f" ] || { echo "legacy-timm pass: $f does not exist: update the list in $0" >&2; exit 2; }
done
# Skips are checked against .ci/expected-skips.txt (pass legacy_timm); pytest's exit 5 (no test) fails the pass.
exec "$PYTHON" .ci/check_skips.py legacy_timm -- "$PYTHON" -m pytest -q -rfEs -p no:cacheprovider "${tests[@]}" "$@"
