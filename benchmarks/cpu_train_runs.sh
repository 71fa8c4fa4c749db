#!/usr/bin/env bash
# Whole train.py runs on the CPU, one process per run, fast-path modes alternated: what the step benchmark cannot
# see (data loading, evaluation, checkpoints, cold compiles). Prints numbers, asserts nothing.
#
#   bash benchmarks/cpu_train_runs.sh [OUT_DIR] [REPS] [MODES]     (defaults: output/bench_train_runs, 3, "none nhwc")
#
#   digits   `make demo`'s recipe (`make demo-args`: van_b0 @32 px, batch 32, 10 epochs = 440 steps, -j 2): wall
#            seconds of the whole process, and the final top-1
#   synth    van_b0 @224 px, batch 32, --dataset synthetic, 1 epoch of 12 steps, -j 0: train.py's training FPS
# RUNS="digits synth" (the default) selects the runs. Within each repetition the order of the modes rotates, so
# that a drift in the machine's load favours none. TORCHINDUCTOR_CACHE_DIR is left as it is: set it to an empty
# folder to count cold compiles in.
set -u
cd "$(dirname "$0")/.."
OUT=${1:-output/bench_train_runs}
REPS=${2:-3}
read -r -a MODES <<< "${3:-none nhwc}"
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT" || exit 1
DIGITS=$OUT/digits
[[ -d $DIGITS/train ]] || "$PY" -m vancls.digits "$DIGITS" >/dev/null || exit 1
read -r -a DEMO_ARGS <<< "$(make -s demo-args)"
RUNS=" ${RUNS:-digits synth} "
RESULTS=$OUT/runs.tsv
printf 'rep\trun\tmode\twall_s\ttrain_img_per_sec\tfinal_top1\n' > "$RESULTS"

one() {  # REP RUN MODE ARGS...
    local rep=$1 run=$2 mode=$3
    shift 3
    local dir=$OUT/$run-$mode-$rep
    rm -rf -- "$dir"
    local t0 t1
    t0=$(date +%s.%N)
    if ! "$PY" train.py "$@" --fast-path "$mode" --device cpu --output "$dir" --experiment run > "$dir.log" 2>&1; then
        echo "$run $mode #$rep failed (log: $dir.log)" >&2
        return
    fi
    t1=$(date +%s.%N)
    "$PY" - "$dir/run/results.json" "$rep" "$run" "$mode" "$t0" "$t1" >> "$RESULTS" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{sys.argv[2]}\t{sys.argv[3]}\t{sys.argv[4]}\t{float(sys.argv[6]) - float(sys.argv[5]):.1f}\t"
      f"{r['train_img_per_sec']:.2f}\t{r['final_top1']}")
PY
    tail -1 "$RESULTS"
}

for rep in $(seq 1 "$REPS"); do
    n=${#MODES[@]}
    for i in $(seq 0 $((n - 1))); do
        mode=${MODES[$(( (i + rep - 1) % n ))]}
        [[ $RUNS == *" digits "* ]] && one "$rep" digits "$mode" "$DIGITS" "${DEMO_ARGS[@]}"
        [[ $RUNS == *" synth "* ]] && one "$rep" synth "$mode" --dataset synthetic --model van_b0 --img-size 224 \
            -b 32 --epochs 1 --max-steps 12 -j 0 --log-interval 4
    done
done
"$PY" - "$RESULTS" "${MODES[0]}" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter='\t'))
base = sys.argv[2]
for run, key, better in (('digits', 'wall_s', 'lower'), ('synth', 'train_img_per_sec', 'higher')):
    by = {}
    for r in rows:
        if r['run'] == run:
            by.setdefault(r['mode'], {})[r['rep']] = float(r[key])
    for mode, vals in by.items():
        v = sorted(vals.values())
        ratios = sorted((by[base][k] / x if better == 'lower' else x / by[base][k]) for k, x in vals.items()
                        if k in by.get(base, {}))
        line = f'{run:6s} {mode:9s} {key} median {statistics.median(v):.2f} (range {v[0]:.2f}-{v[-1]:.2f})'
        if ratios and mode != base:
            line += f'; speed vs {base}: {statistics.median(ratios):.2f}x ({ratios[0]:.2f}-{ratios[-1]:.2f})'
        print(line)
PY
