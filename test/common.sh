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
# What the caller set, before van_init fills in defaults: a script that gets a checkpoint uses the model it names
# unless MODEL is set; an unset PYTHON is looked for (van_find_python).
VAN_USER_MODEL=${MODEL-}
VAN_USER_PYTHON=${PYTHON-}
VAN_LOG=''

van_die() {  # one clear line on stderr (and in the run's log, once it has one), non-zero exit, never a Final line
    echo "error: $VAN_SCRIPT: $*" >&2
    if [[ -n $VAN_LOG && -f $VAN_LOG ]]; then echo "error: $VAN_SCRIPT: $*" >> "$VAN_LOG"; fi
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

van_check_data() {  # an ImageFolder root with the splits this run reads, a .tar of it, or WebDataset shards
    [[ -n $data_path ]] || van_die "--data_path=DIR is required (an ImageFolder root with train/ and val/ inside)"
    # Shards (python -m vancls.shards): a URL or brace pattern (checked by train.py as it opens them), or a folder
    # with _info.json; the reference's .tar of the tree. train.py tells them apart from DATA_DIR.
    case $data_path in
        *://*) return ;;
        *'{'*'..'*'}'*)
            [[ -f $(dirname "$data_path")/_info.json ]] ||
                van_die "--data_path=$data_path: no _info.json beside the shards (write them with python -m vancls.shards)"
            data_path=$(cd "$(dirname "$data_path")" && pwd)/$(basename "$data_path"); return ;;
        *.tar)
            [[ -f $data_path ]] || van_die "--data_path=$data_path: no such file"
            data_path=$(cd "$(dirname "$data_path")" && pwd)/$(basename "$data_path"); return ;;
    esac
    [[ -d $data_path ]] || van_die "--data_path=$data_path: no such directory"
    data_path=$(cd "$data_path" && pwd)
    [[ -f $data_path/_info.json ]] && return
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

van_find_python() {
    # PYTHON as set; else python3 when it has torch; else the repository's .venv (what `make setup` creates), so that
    # the README's commands work after `make demo` without activating it. VAN_PYTHON_NOTE says which, for the log.
    if [[ -n $VAN_USER_PYTHON ]]; then VAN_PYTHON_NOTE='PYTHON'; return 0; fi
    PYTHON=python3 VAN_PYTHON_NOTE='python3 on PATH'
    local has_torch='import importlib.util, sys; sys.exit(importlib.util.find_spec("torch") is None)'
    if command -v python3 >/dev/null 2>&1 && python3 -c "$has_torch" 2>/dev/null; then return 0; fi
    if [[ -x $VAN_ROOT/.venv/bin/python ]]; then
        PYTHON=$VAN_ROOT/.venv/bin/python
        VAN_PYTHON_NOTE="the repository's .venv: no python3 on PATH has torch"
    else
        VAN_PYTHON_NOTE="python3 on PATH has no torch and there is no $VAN_ROOT/.venv (make setup creates it)"
    fi
}

van_python_line() {  # WHAT CODE ARGS...: print the output of $PYTHON -c CODE ARGS, run in the repository root
    # On failure: die with the program's `error: ...` line, else its last stderr line (e.g. No module named 'torch').
    # Callers run it as VAR=$(van_python_line ...) || exit: van_die then ends the command substitution.
    local what=$1 code=$2 err out status msg
    shift 2
    err=$(mktemp "${TMPDIR:-/tmp}/van_err.XXXXXX") || van_die "cannot create a temporary file"
    out=$(cd "$VAN_ROOT" && $PYTHON -c "$code" "$@" 2>"$err")
    status=$?
    msg=$(grep '^error: ' "$err" | tail -n 1)
    [[ -n $msg ]] || msg=$(tail -n 1 "$err")
    rm -f -- "$err"
    (( status == 0 )) || van_die "$what: ${msg#error: } (python: $PYTHON, $VAN_PYTHON_NOTE)"
    printf '%s\n' "$out"
}

van_detect_device() {
    # DEVICE=auto resolves in vancls.device's one order (CUDA, then an NPU, then the CPU), asked of the interpreter
    # the run uses. CANN's environment (env_npu.sh) is sourced for the question, since torch_npu imports only with
    # it, and kept for an NPU run.
    local requested=${DEVICE:-auto}
    case $requested in
        auto|npu|cuda|cpu) ;;
        *) van_die "DEVICE must be auto, npu, cuda or cpu, got '$requested'" ;;
    esac
    command -v "${PYTHON%% *}" >/dev/null 2>&1 || van_die "python not found: '$PYTHON' (set PYTHON=/path/to/python)"
    if [[ $requested == cpu ]]; then
        DEVICE_TYPE=cpu  # always usable: no need to start torch to know
    else
        DEVICE_TYPE=$(
            # shellcheck source=test/env_npu.sh
            if [[ $requested != cuda ]]; then source "$VAN_TEST_DIR/env_npu.sh" >/dev/null 2>&1; fi
            van_python_line "DEVICE=$requested" \
                'import sys; from vancls.device import print_device_type; sys.exit(print_device_type(sys.argv[1]))' \
                "$requested"
        ) || exit
    fi
    if [[ $DEVICE_TYPE == npu ]]; then
        # shellcheck source=test/env_npu.sh
        source "$VAN_TEST_DIR/env_npu.sh"
    fi
}

van_checkpoint_model() {  # MODEL = the architecture that the checkpoint pth_path names (vancls.checkpoint)
    local trust=0 a
    for a in "${VAN_EXTRA[@]}"; do [[ $a == --trust-checkpoint ]] && trust=1; done
    MODEL=$(van_python_line "cannot read the model of $pth_path" '
import sys
from vancls.checkpoint import checkpoint_meta, read_checkpoint
try:
    print(checkpoint_meta(read_checkpoint(sys.argv[1], trust=sys.argv[2] == "1"))["arch"] or "")
except Exception as e:  # the checkpoint errors name the file and the cause
    sys.exit(f"error: {e}")' "$pth_path" "$trust") || exit
    [[ -n $MODEL ]] || van_die "$pth_path does not name its model: set MODEL (van_b0 .. van_b6)"
}

van_init() {  # MODE DEFAULT_NPROC ARGS...
    VAN_MODE=$1
    local default_nproc=$2
    shift 2
    van_parse_args "$@"

    PYTHON=${PYTHON:-python3}
    van_find_python
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
    # A checkpoint names its model: fine-tuning uses it unless MODEL is set. Evaluation passes no --model then:
    # validate.py takes the model, image size and preprocessing that the checkpoint was trained with.
    if [[ -z $VAN_USER_MODEL && $VAN_MODE == finetune ]]; then van_checkpoint_model; fi
    if [[ -z $VAN_USER_MODEL && $VAN_MODE == eval ]]; then MODEL=''; fi
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
    VAN_RESUME=$resume  # for the message after a preemption
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
        # After forwarding a signal, torchrun kills the workers that have not exited within this many seconds
        # (torch >= 2.2; its default, 30 s, can be shorter than one step plus the checkpoint write).
        export PET_SHUTDOWN_TIMEOUT=${PET_SHUTDOWN_TIMEOUT:-300}
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
        echo "$VAN_SCRIPT: device $DEVICE_TYPE x $NPROC, model ${MODEL:-from the checkpoint}," \
             "batch $BATCH_SIZE per device, log $VAN_LOG"
        echo "$VAN_SCRIPT: python $PYTHON ($VAN_PYTHON_NOTE)"
        echo "+ ${cmd[*]}"
    } | tee "$VAN_LOG"
    VAN_ENTRY=$entry
    van_run_logged "${cmd[@]}"
    local status=$?
    van_check_stop "$entry" "$status"
    if (( status != 0 )); then
        local why
        why=$(grep -m1 '^error: ' "$VAN_LOG" 2>/dev/null)  # the port's one-line message for user errors, if any
        VAN_DIE_STATUS=$status van_die "$entry failed with exit status $status${why:+ (${why#error: })} (log: $VAN_LOG)"
    fi
    [[ -f $RESULTS_JSON ]] || van_die "$entry finished but wrote no $RESULTS_JSON (log: $VAN_LOG)"
}

# Signals. The program runs in a process group of its own, and this script forwards each stop signal it gets, once,
# to that group: a signal to the script's PID (what a container runtime sends to PID 1) and one to its process group
# (SLURM, Ctrl-C in a terminal) both reach torchrun (or the single train.py) exactly once; torchrun passes it to the
# workers, which finish the step, write recovery.pth.tar and exit. The script waits for them, then exits with
# 128 + the signal. A signal sent to torchrun itself is recognized by train.py's `Preempted by` line.
VAN_STOP_SIGNALS=(TERM INT USR1 HUP QUIT)
# Runs ARGV in a process group of its own, with the dispositions a program started from a terminal has: bash
# starts a background job with SIGINT and SIGQUIT ignored, and Python ignores SIGPIPE and SIGXFSZ; exec keeps both.
VAN_EXEC_IN_OWN_GROUP='import os, signal, sys
os.setpgid(0, 0)
for s in (signal.SIGINT, signal.SIGQUIT, signal.SIGPIPE, signal.SIGXFSZ):
    signal.signal(s, signal.SIG_DFL)
os.execvp(sys.argv[1], sys.argv[1:])'

van_run_logged() {  # CMD...: run CMD (in the repository root) in its own process group, output to the console and
    # appended to VAN_LOG; returns its exit status. tee ignores the stop signals, so the last lines reach the log.
    local fifo_dir tee_pid sig status tee_opts=(-a)
    if ! fifo_dir=$(mktemp -d "${TMPDIR:-/tmp}/van_log.XXXXXX") || ! mkfifo "$fifo_dir/out"; then
        van_die "cannot create a pipe for the log in ${TMPDIR:-/tmp}"
    fi
    # GNU tee -p: a console that went away (a closed terminal, a killed `| less`) does not stop the log.
    if tee -p /dev/null </dev/null >/dev/null 2>&1; then tee_opts=(-p -a); fi
    ( trap '' "${VAN_STOP_SIGNALS[@]}"; exec tee "${tee_opts[@]}" "$VAN_LOG" ) < "$fifo_dir/out" &
    tee_pid=$!
    VAN_CHILD='' VAN_SIGNAL='' VAN_SIGNAL_SENT=''
    for sig in "${VAN_STOP_SIGNALS[@]}"; do
        # shellcheck disable=SC2064  # the signal's name is fixed now
        trap "van_forward_signal $sig" "$sig"
    done
    # stdin from /dev/null: a process outside the terminal's foreground group must not read it.
    (cd "$VAN_ROOT" && exec $PYTHON -c "$VAN_EXEC_IN_OWN_GROUP" "$@") </dev/null >"$fifo_dir/out" 2>&1 &
    VAN_CHILD=$!
    if [[ -n $VAN_SIGNAL ]]; then van_signal_child "$VAN_SIGNAL"; fi  # arrived before VAN_CHILD was known
    van_wait "$VAN_CHILD"
    status=$VAN_WAIT_STATUS
    van_wait "$tee_pid"  # the last lines are in the log (tee ends when every writer, workers included, has closed)
    trap - "${VAN_STOP_SIGNALS[@]}"
    rm -rf -- "$fifo_dir"
    return "$status"
}

van_wait() {  # PID: wait until it has ended, across trapped signals; VAN_WAIT_STATUS = its exit status
    while :; do
        VAN_TRAPPED=0
        wait "$1"
        VAN_WAIT_STATUS=$?
        (( VAN_TRAPPED )) || return 0  # a trapped signal ends `wait` early: wait again
    done
}

van_forward_signal() {  # SIG: the trap of the stop signals
    VAN_TRAPPED=1
    if [[ -n $VAN_SIGNAL ]]; then
        echo "$VAN_SCRIPT: SIG$1 ignored: already stopping on SIG$VAN_SIGNAL" >&2
        return
    fi
    VAN_SIGNAL=$1
    if [[ -n $VAN_CHILD ]]; then van_signal_child "$1"; fi
    local line="$VAN_SCRIPT: received SIG$1: passed it to $VAN_ENTRY, waiting for it to exit"
    [[ $VAN_ENTRY != train.py ]] || line+=' after its recovery checkpoint'
    echo "$line" >> "$VAN_LOG"  # the log first: the console may be gone (a closed terminal)
    echo "$line"
}

van_signal_child() {  # SIG: once, to the program's process group; before it has one (the first milliseconds), to it
    [[ -z $VAN_SIGNAL_SENT ]] || return 0
    VAN_SIGNAL_SENT=1
    kill -s "$1" -- "-$VAN_CHILD" 2>/dev/null || kill -s "$1" "$VAN_CHILD" 2>/dev/null
}

van_check_stop() {  # ENTRY STATUS: after a stop signal (to this script, or to torchrun), one line and exit 128 + signal
    local entry=$1 status=$2 preempted code
    preempted=$(grep -m1 'Preempted by SIG' "$VAN_LOG" 2>/dev/null)
    [[ -n $VAN_SIGNAL || -n $preempted ]] || return 0
    if [[ -n $VAN_SIGNAL ]]; then
        (( status != 0 )) || [[ ! -f $RESULTS_JSON ]] || return 0  # it finished before the signal took effect
        code=$(( 128 + $(kill -l "$VAN_SIGNAL") ))
    fi
    if [[ -z $preempted ]]; then  # evaluation, or a signal before train.py had its handler (setup)
        local what=' before writing a recovery checkpoint'
        [[ $VAN_MODE != eval ]] || what=''
        VAN_DIE_STATUS=$code van_die "$entry stopped by SIG$VAN_SIGNAL$what (log: $VAN_LOG)"
    fi
    # train.py's line names the signal every rank stopped for and its exit status: 128 + that signal.
    [[ $preempted =~ exit\ status\ ([0-9]+) ]] && code=${code:-${BASH_REMATCH[1]}}
    local next='run this script again to resume'
    if [[ $VAN_RESUME != 1 ]]; then
        if [[ $VAN_MODE == full ]]; then next='run this script again with RESUME=1 to resume'
        else next='this script starts a new run when run again'; fi
    fi
    VAN_DIE_STATUS=${code:-1} van_die "preempted, recovery checkpoint written: $next (log: $VAN_LOG)"
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
    # No MODEL / IMG_SIZE: validate.py takes the model and the image size from the checkpoint.
    local args=("$data_path" --checkpoint "$pth_path" -b "$BATCH_SIZE" --device "$DEVICE_TYPE"
                --results-file "$RESULTS_JSON")
    if [[ -n $MODEL ]]; then args+=(--model "$MODEL"); fi
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
if fps <= 0:  # train.py times every step of a run shorter than its warm-up: 0 means no step ran
    hint = ('the first 5 batches per device are not timed: evaluate more images or use a smaller BATCH_SIZE'
            if mode == 'eval' else 'no training step was timed')
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
model = r.get('model')  # the model that ran (an evaluation without MODEL: the checkpoint's)
if not (isinstance(model, str) and model and model.split() == [model]):
    model = '-'
print(f'{fps:.2f} {batch * ranks / fps:.4f} {loss:.4f} {precision} {model} {acc}')
PY
    ) || van_die "cannot read the results of this run from $RESULTS_JSON"
    local fps step_time loss precision model acc
    read -r fps step_time loss precision model acc <<< "$values"
    if [[ $model == - ]]; then model=${MODEL:-unknown}; fi
    local e2e=$(( $(date +%s) - VAN_START ))

    local case_log=$OUTPUT_DIR/$CaseName.log
    {
        echo "Network = $Network"
        echo "RankSize = $RankSize"
        echo "BatchSize = $BatchSize"
        echo "DeviceType = $(uname -m)"
        echo "Device = $DEVICE_TYPE"
        echo "Model = $model"
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
