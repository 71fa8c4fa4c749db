# Shared logic of the Ascend ModelZoo launch scripts (test/train_*.sh). Sourced, never run on its own.
#
# A launch script does:
#     source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
#     van_init MODE DEFAULT_NPROC "$@"      # MODE: perf | full | finetune | eval
#     van_run_train ARGS... / van_run_eval   # train.py / validate.py, under torchrun when the run is distributed
#     van_report                             # ${CaseName}.log and the Final lines, read from results.json
#
# Arguments (ModelZoo style): --data_path=DIR (required), --device_id=N, --batch_size=N, --epochs=N,
# --pth_path=FILE; anything after `--` goes to train.py / validate.py unchanged.
# Environment overrides (small machines, CI): NPROC MODEL BATCH_SIZE EPOCHS MAX_STEPS IMG_SIZE DEVICE AMP
# WORKERS LR DROP_PATH OUTPUT_ROOT PYTHON TORCHRUN RESUME MAX_RESTARTS RECOVERY_INTERVAL NETWORK.
# README.md (section "Launch scripts") documents them.

VAN_TEST_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VAN_ROOT=$(dirname "$VAN_TEST_DIR")
VAN_SCRIPT=$(basename "$0" .sh)
VAN_START=$(date +%s)

van_die() {  # one clear line on stderr, non-zero exit, never a Final line
    echo "error: $VAN_SCRIPT: $*" >&2
    exit "${VAN_DIE_STATUS:-2}"
}

van_usage() {
    cat <<EOF
usage: bash test/$VAN_SCRIPT.sh --data_path=DIR [--device_id=N] [--batch_size=N] [--epochs=N] [--pth_path=FILE] [-- TRAIN_ARGS...]
       bash test/train_eval_8p.sh DATA_PATH CKPT_PATH
DIR is an ImageFolder root with train/<class>/* and val/<class>/* (or validation/).
Environment: NPROC MODEL BATCH_SIZE EPOCHS MAX_STEPS IMG_SIZE DEVICE(auto|npu|cuda|cpu) AMP(1|0) WORKERS(default:
the CPUs per process, at most 8) LR DROP_PATH OUTPUT_ROOT PYTHON RESUME MAX_RESTARTS RECOVERY_INTERVAL
(see README.md, "Launch scripts")
EOF
}

van_check_int() {  # NAME VALUE MIN
    if ! [[ $2 =~ ^[0-9]+$ ]] || (( 10#$2 < $3 )); then van_die "$1 must be an integer >= $3, got '$2'"; fi
}

van_parse_args() {
    data_path='' pth_path='' arg_device_id='' arg_batch_size='' arg_epochs=''
    VAN_POSITIONAL=() VAN_EXTRA=()
    while (( $# )); do
        case $1 in
            --data_path=*) data_path=${1#*=} ;;
            --device_id=*) arg_device_id=${1#*=} ;;
            --batch_size=*) arg_batch_size=${1#*=} ;;
            --epochs=*) arg_epochs=${1#*=} ;;
            --pth_path=*|--ckpt_path=*) pth_path=${1#*=} ;;
            --data_path|--device_id|--batch_size|--epochs|--pth_path|--ckpt_path)
                (( $# >= 2 )) || van_die "$1 needs a value ($1=VALUE)"
                local opt=$1
                shift
                set -- "$opt=$1" "${@:2}"
                continue ;;
            -h|--help) van_usage; exit 0 ;;
            --) shift; VAN_EXTRA=("$@"); break ;;
            --*) echo "warning: $VAN_SCRIPT: ignoring unknown argument $1" >&2 ;;
            *) VAN_POSITIONAL+=("$1") ;;
        esac
        shift
    done
    # Positional DATA_PATH [CKPT_PATH], as the port's README shows for train_eval_8p.sh.
    if (( ${#VAN_POSITIONAL[@]} )) && [[ -z $data_path ]]; then
        data_path=${VAN_POSITIONAL[0]}
        VAN_POSITIONAL=("${VAN_POSITIONAL[@]:1}")
    fi
    if (( ${#VAN_POSITIONAL[@]} )) && [[ -z $pth_path && ( $VAN_MODE == eval || $VAN_MODE == finetune ) ]]; then
        pth_path=${VAN_POSITIONAL[0]}
        VAN_POSITIONAL=("${VAN_POSITIONAL[@]:1}")
    fi
    (( ${#VAN_POSITIONAL[@]} == 0 )) || van_die "unexpected argument(s): ${VAN_POSITIONAL[*]}"
}

van_check_data() {  # the data set must be an ImageFolder root with the splits this run reads
    [[ -n $data_path ]] || van_die "--data_path=DIR is required (an ImageFolder root with train/ and val/ inside)"
    [[ -d $data_path ]] || van_die "--data_path=$data_path: no such directory"
    data_path=$(cd "$data_path" && pwd)
    if [[ $VAN_MODE != eval && ! -d $data_path/train ]]; then
        van_die "--data_path=$data_path has no train/ folder (expected $data_path/train/<class>/<images> and val/)"
    fi
    if [[ ! -d $data_path/val && ! -d $data_path/validation ]]; then
        van_die "--data_path=$data_path has no val/ (or validation/) folder (expected $data_path/val/<class>/<images>)"
    fi
}

van_check_ckpt() {  # NAME HINT: a checkpoint file, or a run folder holding model_best.pth.tar / last.pth.tar
    local name=$1 hint=$2
    [[ -n $pth_path ]] || van_die "$name is required ($hint)"
    if [[ -d $pth_path ]]; then
        local f
        for f in model_best.pth.tar last.pth.tar; do
            if [[ -f $pth_path/$f ]]; then pth_path=$pth_path/$f; break; fi
        done
        [[ -f $pth_path ]] || van_die "$name $pth_path is a folder without model_best.pth.tar or last.pth.tar"
    fi
    [[ -f $pth_path ]] || van_die "$name $pth_path: no such file"
    pth_path=$(cd "$(dirname "$pth_path")" && pwd)/$(basename "$pth_path")
}

van_detect_device() {
    # NPU when torch_npu imports (CANN's environment sourced first: torch_npu needs it), else CUDA, else CPU.
    DEVICE_TYPE=${DEVICE:-auto}
    case $DEVICE_TYPE in auto|npu|cuda|cpu) ;; *) van_die "DEVICE must be auto, npu, cuda or cpu, got '$DEVICE_TYPE'" ;; esac
    command -v "${PYTHON%% *}" >/dev/null 2>&1 || van_die "python not found: '$PYTHON' (set PYTHON=/path/to/python)"
    if [[ $DEVICE_TYPE == auto ]]; then
        # shellcheck source=test/env_npu.sh
        if ( source "$VAN_TEST_DIR/env_npu.sh" >/dev/null 2>&1; $PYTHON -c 'import torch_npu' ) >/dev/null 2>&1; then
            DEVICE_TYPE=npu
        else
            DEVICE_TYPE=$($PYTHON -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")' 2>/dev/null) \
                || van_die "$PYTHON cannot import torch (activate the environment or set PYTHON=)"
        fi
    fi
    if [[ $DEVICE_TYPE == npu ]]; then
        # shellcheck source=test/env_npu.sh
        source "$VAN_TEST_DIR/env_npu.sh"
    fi
}

van_init() {  # MODE DEFAULT_NPROC ARGS...
    VAN_MODE=$1
    local default_nproc=$2
    shift 2
    van_parse_args "$@"

    PYTHON=${PYTHON:-python3}
    ASCEND_DEVICE_ID=${arg_device_id:-${ASCEND_DEVICE_ID:-0}}
    van_check_int --device_id "$ASCEND_DEVICE_ID" 0
    MODEL=${MODEL:-van_base}
    BATCH_SIZE=${arg_batch_size:-${BATCH_SIZE:-128}}
    van_check_int "--batch_size/BATCH_SIZE" "$BATCH_SIZE" 1
    NPROC=${NPROC:-$default_nproc}
    van_check_int NPROC "$NPROC" 1
    # Unset: train.py / validate.py pick the loader workers from the CPUs each process has (vancls.device).
    [[ -z $WORKERS ]] || van_check_int WORKERS "$WORKERS" 0
    LR=${LR:-1e-3}
    DROP_PATH=${DROP_PATH:-0.1}
    # AMP=1 stays the default everywhere: --amp is float16 on cuda/npu and, on the CPU, bfloat16 only where the
    # processor computes it natively (float32 elsewhere); results.json's amp_precision says which ran.
    AMP=${AMP:-1}
    [[ $AMP == 0 || $AMP == 1 ]] || van_die "AMP must be 1 (mixed precision, the default) or 0, got '$AMP'"
    [[ -z $IMG_SIZE ]] || van_check_int IMG_SIZE "$IMG_SIZE" 1
    case $VAN_MODE in
        perf)
            [[ -z $arg_epochs ]] || echo "warning: $VAN_SCRIPT: --epochs is ignored (performance runs train 1 epoch)" >&2
            EPOCHS=1
            MAX_STEPS=${MAX_STEPS:-500} ;;
        full) EPOCHS=${arg_epochs:-${EPOCHS:-300}} ;;
        finetune) EPOCHS=${arg_epochs:-${EPOCHS:-30}} ;;
        eval) EPOCHS='' ;;
        *) van_die "internal: unknown mode '$VAN_MODE'" ;;
    esac
    [[ -z $EPOCHS ]] || van_check_int "--epochs/EPOCHS" "$EPOCHS" 1
    [[ -z $MAX_STEPS ]] || van_check_int MAX_STEPS "$MAX_STEPS" 1

    van_check_data
    case $VAN_MODE in
        eval) van_check_ckpt CKPT_PATH "the second argument, or --pth_path=FILE: the checkpoint to evaluate" ;;
        finetune) van_check_ckpt --pth_path "--pth_path=FILE: the checkpoint to fine-tune from" ;;
    esac

    # Dashboard fields.
    Network=${NETWORK:-VAN_for_PyTorch}
    RankSize=$NPROC
    BatchSize=$BATCH_SIZE
    if [[ $VAN_MODE == perf ]]; then CaseName=${Network}_bs${BatchSize}_${RankSize}p_perf
    else CaseName=${Network}_bs${BatchSize}_${RankSize}p_acc; fi

    OUTPUT_DIR=${OUTPUT_ROOT:-$VAN_TEST_DIR/output}/$ASCEND_DEVICE_ID
    mkdir -p "$OUTPUT_DIR" || van_die "cannot create the output folder $OUTPUT_DIR"
    OUTPUT_DIR=$(cd "$OUTPUT_DIR" && pwd)
    RUN_DIR=$OUTPUT_DIR/$VAN_SCRIPT
    if [[ $VAN_MODE == eval ]]; then VAN_LOG=$OUTPUT_DIR/eval_${ASCEND_DEVICE_ID}.log
    else VAN_LOG=$OUTPUT_DIR/train_${ASCEND_DEVICE_ID}.log; fi
    RESULTS_JSON=$RUN_DIR/results.json

    van_detect_device
    # One device: pin the process to --device_id (it sees that device as device 0).
    if (( NPROC == 1 )); then
        if [[ $DEVICE_TYPE == npu && -z $ASCEND_RT_VISIBLE_DEVICES ]]; then export ASCEND_RT_VISIBLE_DEVICES=$ASCEND_DEVICE_ID; fi
        if [[ $DEVICE_TYPE == cuda && -z $CUDA_VISIBLE_DEVICES ]]; then export CUDA_VISIBLE_DEVICES=$ASCEND_DEVICE_ID; fi
    fi
    export PYTHONUNBUFFERED=1  # the log (a pipe) gets each line as it is written
}

van_prepare_run_dir() {  # RESUME(0|1): keep an unfinished run of the same script to resume it, else start afresh
    local resume=$1
    [[ $resume == 0 || $resume == 1 ]] || van_die "RESUME must be 1 (resume an unfinished run) or 0, got '$resume'"
    [[ -n $RUN_DIR && $RUN_DIR == */$VAN_SCRIPT ]] || van_die "internal: bad run folder '$RUN_DIR'"
    if [[ -d $RUN_DIR ]]; then
        if [[ $resume == 1 && ! -f $RESULTS_JSON ]] && compgen -G "$RUN_DIR/*.pth.tar" >/dev/null; then
            echo "$VAN_SCRIPT: resuming the unfinished run in $RUN_DIR (RESUME=0 starts afresh)"
        elif [[ $VAN_MODE == perf || $VAN_MODE == eval ]]; then
            rm -rf -- "$RUN_DIR"  # performance and evaluation runs are cheap to redo and hold no weights of value
        else
            local old
            old=$RUN_DIR.old-$(date +%Y%m%d-%H%M%S)
            if [[ -e $old ]]; then old=$old-$$; fi
            mv -- "$RUN_DIR" "$old" || van_die "cannot move the previous run $RUN_DIR aside"
            echo "$VAN_SCRIPT: previous run moved to $old"
            # Fine-tuning from a checkpoint of the previous run: follow it to where it went.
            if [[ $pth_path == "$RUN_DIR"/* ]]; then pth_path=$old/${pth_path#"$RUN_DIR"/}; fi
        fi
    fi
    mkdir -p "$RUN_DIR" || van_die "cannot create $RUN_DIR"
    rm -f -- "$RESULTS_JSON"
}

van_launch() {  # ENTRY.py ARGS...: one process, or torchrun with NPROC processes; output to the console and VAN_LOG
    local entry=$1
    shift
    local cmd
    if [[ $VAN_DISTRIBUTED == 1 ]] || (( NPROC > 1 )); then
        local torchrun
        read -r -a torchrun <<< "${TORCHRUN:-$PYTHON -m torch.distributed.run}"  # = torchrun, same interpreter
        cmd=("${torchrun[@]}" --standalone --nnodes=1 --nproc_per_node="$NPROC")
        # Preemption: torchrun forwards these signals to the workers, which save recovery.pth.tar (train.py
        # --preempt-signals). SIGUSR1 (SLURM's --signal) is not in torchrun's default list: unhandled, it would end
        # the launcher alone. PET_* is read by torchrun versions that have the option and ignored by older ones.
        export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
        if [[ -z $OMP_NUM_THREADS ]]; then
            # torchrun would give each process 1 thread; give each its share of the CPUs, as a single process
            # computes for itself (vancls.device.cpu_threads).
            OMP_NUM_THREADS=$(cd "$VAN_ROOT" && LOCAL_WORLD_SIZE=$NPROC $PYTHON -c \
                'from vancls.device import cpu_threads; print(cpu_threads())') \
                || van_die "$PYTHON cannot import vancls.device to size the threads (set OMP_NUM_THREADS=N)"
            export OMP_NUM_THREADS
        fi
        if [[ -n $VAN_MAX_RESTARTS ]]; then
            cmd+=(--max-restarts="$VAN_MAX_RESTARTS")
            # A restarted worker group must not meet the store keys of the group that died: with the store
            # torchrun's agent shares with the workers (the default since torch 2.4), the new processes read the
            # dead ones' addresses and fail to connect (pytorch/pytorch#135712). Each attempt gets its own store.
            export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
        fi
        cmd+=("$VAN_ROOT/$entry")
    else
        read -r -a cmd <<< "$PYTHON"
        cmd+=("$VAN_ROOT/$entry")
    fi
    cmd+=("$@" "${VAN_EXTRA[@]}")
    {
        echo "$VAN_SCRIPT: device $DEVICE_TYPE x $NPROC, model $MODEL, batch $BATCH_SIZE per device, log $VAN_LOG"
        echo "+ ${cmd[*]}"
    } | tee "$VAN_LOG"
    (cd "$VAN_ROOT" && "${cmd[@]}") 2>&1 | tee -a "$VAN_LOG"
    local status=${PIPESTATUS[0]}
    if (( status != 0 )); then
        local why
        why=$(grep -m1 '^error: ' "$VAN_LOG" 2>/dev/null)  # the port's one-line message for user errors, if any
        if grep -q '^Preempted by' "$VAN_LOG" 2>/dev/null; then
            why="error: preempted, recovery checkpoint written: run this script again to resume (RESUME=1)"
        fi
        VAN_DIE_STATUS=$status van_die "$entry failed with exit status $status${why:+ (${why#error: })} (log: $VAN_LOG)"
    fi
    [[ -f $RESULTS_JSON ]] || van_die "$entry finished but wrote no $RESULTS_JSON (log: $VAN_LOG)"
}

van_run_train() {  # extra train.py arguments for this script
    local args=("$data_path" --model "$MODEL" -b "$BATCH_SIZE" --lr "$LR" --drop-path "$DROP_PATH"
                --epochs "$EPOCHS" --device "$DEVICE_TYPE" --output "$OUTPUT_DIR" --experiment "$VAN_SCRIPT"
                --preempt-signals "${PREEMPT_SIGNALS:-TERM,INT,USR1}")
    if [[ -n $WORKERS ]]; then args+=(--workers "$WORKERS"); fi
    if [[ $AMP == 1 ]]; then args+=(--amp); fi
    if [[ -n $IMG_SIZE ]]; then args+=(--img-size "$IMG_SIZE"); fi
    if [[ -n $MAX_STEPS ]]; then args+=(--max-steps "$MAX_STEPS"); fi
    van_launch train.py "${args[@]}" "$@"
}

van_run_eval() {
    local args=("$data_path" --model "$MODEL" --checkpoint "$pth_path" -b "$BATCH_SIZE" --device "$DEVICE_TYPE"
                --results-file "$RESULTS_JSON")
    if [[ -n $WORKERS ]]; then args+=(--workers "$WORKERS"); fi
    if [[ $AMP == 1 ]]; then args+=(--amp); fi
    if [[ -n $IMG_SIZE ]]; then args+=(--img-size "$IMG_SIZE"); fi
    van_launch validate.py "${args[@]}"
}

van_report() {
    # Values come from results.json only. A missing or invalid value stops the script before any Final line.
    local values
    values=$($PYTHON - "$RESULTS_JSON" "$VAN_MODE" "$BatchSize" "$RankSize" <<'PY'
import json, math, sys
path, mode, batch, ranks = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
with open(path) as f:
    r = json.load(f)
keys = {'eval': ('img_per_sec', 'top1', 'loss')}.get(mode, ('train_img_per_sec', 'best_top1', 'train_loss'))
def num(key):
    v = r.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        sys.exit(f'error: {path}: {key} is {v!r}, not a number')
    return float(v)
fps = num(keys[0])
if fps <= 0:
    hint = ('the first 5 batches per device are not timed: evaluate more images or use a smaller BATCH_SIZE'
            if mode == 'eval' else 'the first 5 steps of each epoch are not timed: raise MAX_STEPS above 5')
    sys.exit(f'error: {path}: {keys[0]} is {fps}: no throughput was measured ({hint})')
loss = num(keys[2])
acc = ''
if mode != 'perf':
    acc = num(keys[1])
    if not 0 <= acc <= 100:
        sys.exit(f'error: {path}: {keys[1]} is {acc}, outside [0, 100]')
    acc = f'{acc:.3f}'
# The precision the run computed in (--amp may run float32 on a CPU); results.json from before amp_precision
# existed has only 'amp' (the autocast dtype, or null when off).
if 'amp_precision' in r:
    precision = r['amp_precision']
else:
    precision = (r['amp'] or 'float32') if 'amp' in r else 'unknown'
if not (isinstance(precision, str) and precision.isidentifier()):  # one word on the line that bash reads
    precision = 'unknown'
print(f'{fps:.2f} {batch * ranks / fps:.4f} {loss:.4f} {precision} {acc}')
PY
    ) || van_die "cannot read the results of this run from $RESULTS_JSON"
    local fps step_time loss precision acc
    read -r fps step_time loss precision acc <<< "$values"
    local e2e=$(( $(date +%s) - VAN_START ))

    local case_log=$OUTPUT_DIR/$CaseName.log
    {
        echo "Network = $Network"
        echo "RankSize = $RankSize"
        echo "BatchSize = $BatchSize"
        echo "DeviceType = $(uname -m)"
        echo "Device = $DEVICE_TYPE"
        echo "Model = $MODEL"
        echo "Precision = $precision"
        echo "CaseName = $CaseName"
        echo "ActualFPS = $fps"
        echo "TrainingTime = $step_time"
        if [[ $VAN_MODE != perf ]]; then echo "TrainAccuracy = $acc"; fi
        echo "ActualLoss = $loss"
        echo "E2ETrainingTime = $e2e"
    } > "$case_log" || van_die "cannot write $case_log"

    echo "------------------ Final result ------------------"
    echo "Final Performance images/sec : $fps"
    if [[ $VAN_MODE != perf ]]; then echo "Final Train Accuracy : $acc"; fi
    echo "E2E Training Duration sec : $e2e"
}
