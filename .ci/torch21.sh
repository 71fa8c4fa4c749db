#!/usr/bin/env bash
# Oldest-torch pass: the model, device/AMP, training, resume and checkpoint tests again on torch 2.1 (the oldest
# torch we support: current torch_npu releases pair with torch 2.1 and newer), in a second venv built from
# requirements-torch21.txt. The run fails if the venv's torch is not 2.1.x, if `import models` fails there, if a
# listed test file is missing, if pytest collects no test (its exit 5), or on a skip .ci/expected-skips.txt does
# not list.
#
#   bash .ci/torch21.sh [extra pytest args]       env: PYTHON (makes the venv), TORCH21_VENV (default .venv-torch21)
set -euo pipefail
cd "$(dirname "$0")/.."

REQ=requirements-torch21.txt
VENV="${TORCH21_VENV:-.venv-torch21}"
PY="$VENV/bin/python"

# (Re)build the venv when it is missing or was built from another requirements file (a copy is kept inside it).
if [ ! -x "$PY" ] || ! cmp -s "$REQ" "$VENV/.installed"; then
    rm -rf "$VENV"
    "${PYTHON:-python3}" -m venv "$VENV"
    start=$SECONDS
    "$PY" -m pip install --quiet --disable-pip-version-check -r "$REQ"
    cp "$REQ" "$VENV/.installed"
    echo "torch-2.1 pass: venv $VENV installed in $((SECONDS - start)) s"
fi

"$PY" -c "
import torch, torchvision, timm
assert torch.__version__.startswith('2.1.'), f'expected torch 2.1.x, imported {torch.__version__} from {torch.__file__}'
print(f'torch-2.1 pass: torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}')
"
# The package must import on the old torch whatever it lacks (the fast paths degrade; they never break the import).
"$PY" -c "import models"

# Model and checkpoint loading (test_model), the fast paths' fallback (test_fast_paths: they skip on torch < 2.4),
# the AMP/device layer (test_device), training end to end, DDP and AMP runs (test_train), kill/resume, bad and
# malicious checkpoints (test_resilience), the safe loader that stands in for torch's allowlist there
# (test_safe_load), signal-driven checkpoint and resume (test_preemption), and the reference's checkpoints and
# command lines (test_reference). A listed file that does not exist stops the run (a renamed test file must not
# drop out of the pass unnoticed).
tests=(tests/test_model.py tests/test_fast_paths.py tests/test_device.py tests/test_train.py
       tests/test_resilience.py tests/test_safe_load.py tests/test_preemption.py tests/test_reference.py
       tests/test_resume_auto.py tests/test_structure.py)
for f in "${tests[@]}"; do
    [ -f "$f" ] || { echo "torch-2.1 pass: $f does not exist: update the list in $0" >&2; exit 2; }
done

# Every unit test of these files, and of their slow tests only those marked oldtorch (pytest.ini: DDP, torchrun,
# AMP, checkpoints, resume; the launch-script, fault-injection and accuracy runs repeat Python-level logic that the
# main pass covers). Skips are checked against .ci/expected-skips.txt (pass torch21); pytest's exit 5 (no test)
# fails the pass.
exec "$PY" .ci/check_skips.py torch21 -- "$PY" -m pytest -q -rfEs -p no:cacheprovider \
    -m "not soak and (not slow or oldtorch)" "${tests[@]}" "$@"
