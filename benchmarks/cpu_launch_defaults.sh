#!/usr/bin/env bash
# Issue 14: the launch scripts' defaults on a CPU against the hand-tuned settings, alternated in one script.
#
#   bash benchmarks/cpu_launch_defaults.sh [OUT_DIR] [REPS]     (defaults: output/bench_cpu_defaults, 3)
#
# Both runs: MODEL=van_b0 IMG_SIZE=32 BATCH_SIZE=32 DEVICE=cpu NPROC=1 MAX_STEPS=15
#            bash test/train_performance_1p.sh --data_path=<digits>
#   defaults   AMP, WORKERS and OMP_NUM_THREADS unset: what the scripts and vancls.device pick
#   tuned      AMP=0 WORKERS=2 (the README's old advice for CPUs)
# The order inside each repetition alternates (defaults first, then tuned first, ...) so that a drift in the
# machine's load does not favour one side. Prints each run's img/s (results.json train_img_per_sec) and the
# precision it used, then the median and range of each and of the per-repetition ratio defaults / tuned.
# Takes a few minutes on 2 cores. Not a test: it asserts nothing.
set -u
cd "$(dirname "$0")/.."
OUT=${1:-output/bench_cpu_defaults}
REPS=${2:-3}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT" || exit 1
DIGITS=$OUT/digits
if [[ ! -d $DIGITS/train ]]; then
    "$PY" -m vancls.digits "$DIGITS" >/dev/null || { echo "error: cannot write the digits set to $DIGITS" >&2; exit 1; }
fi
RESULTS=$OUT/runs.tsv
printf 'rep\tconfig\timg_per_sec\tprecision\n' > "$RESULTS"

run() {  # REP CONFIG ENV...: one scaled-down performance run; appends a line to $RESULTS
    local rep=$1 config=$2
    shift 2
    local root=$OUT/$config-$rep
    rm -rf -- "$root"
    if ! env -u AMP -u WORKERS -u OMP_NUM_THREADS -u LR -u DROP_PATH -u TORCHRUN \
            MODEL=van_b0 IMG_SIZE=32 BATCH_SIZE=32 DEVICE=cpu NPROC=1 MAX_STEPS=15 \
            PYTHON="$PY" OUTPUT_ROOT="$root" "$@" \
            bash test/train_performance_1p.sh --data_path="$DIGITS" > "$root.log" 2>&1; then
        echo "run $config #$rep failed (log: $root.log)" >&2
        return
    fi
    "$PY" - "$root/0/train_performance_1p/results.json" "$rep" "$config" >> "$RESULTS" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{sys.argv[2]}\t{sys.argv[3]}\t{r['train_img_per_sec']:.2f}\t{r.get('amp_precision', r.get('amp'))}")
PY
    tail -n 1 "$RESULTS"
}

for ((rep = 1; rep <= REPS; rep++)); do
    if (( rep % 2 )); then
        run "$rep" defaults
        run "$rep" tuned AMP=0 WORKERS=2
    else
        run "$rep" tuned AMP=0 WORKERS=2
        run "$rep" defaults
    fi
done

"$PY" - "$RESULTS" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter='\t'))
fps = {}
for r in rows:
    fps.setdefault(r['config'], {})[r['rep']] = float(r['img_per_sec'])
def summary(values):
    return f'median {statistics.median(values):.2f}, range {min(values):.2f}-{max(values):.2f} (n={len(values)})'
print()
for config in ('defaults', 'tuned'):
    if fps.get(config):
        precisions = sorted({r['precision'] for r in rows if r['config'] == config})
        print(f'{config:9s} img/s: {summary(list(fps[config].values()))}; precision {", ".join(precisions)}')
reps = sorted(set(fps.get('defaults', {})) & set(fps.get('tuned', {})))
if reps:
    ratios = [fps['defaults'][k] / fps['tuned'][k] for k in reps]
    print(f'ratio defaults/tuned: {summary(ratios)}  (issue 14 asks for >= 0.8)')
else:
    print('no repetition finished both runs: no ratio')
PY
