#!/bin/bash
# NPU environment of the launch scripts: `source test/env_npu.sh`.
# Sources CANN's set_env.sh where CANN is installed and sets the Ascend runtime variables the port runs with.
# Harmless elsewhere: without CANN nothing is sourced, and the variables below are only read by CANN/torch_npu.
# Every variable keeps a value the caller already exported; CANN_SET_ENV=/path/to/set_env.sh picks the install.

_van_cann_env() {
    local f
    if [[ -n ${VAN_CANN_SOURCED:-} ]]; then return 0; fi
    for f in "${CANN_SET_ENV:-}" \
             "${ASCEND_HOME:-/usr/local/Ascend}/ascend-toolkit/set_env.sh" \
             "${ASCEND_HOME:-/usr/local/Ascend}/nnae/set_env.sh" \
             "$HOME/Ascend/ascend-toolkit/set_env.sh"; do
        if [[ -n $f && -f $f ]]; then
            # CANN's scripts are not written for `set -eu` callers: source them with both off, then restore.
            local saved=$-
            set +eu
            # shellcheck disable=SC1090  # CANN's set_env.sh, found at run time
            source "$f"
            [[ $saved == *e* ]] && set -e
            [[ $saved == *u* ]] && set -u
            export VAN_CANN_SOURCED=$f
            break
        fi
    done
    # The driver's libraries (libascend_hal.so) are not always on the path set_env.sh sets.
    local driver=${ASCEND_HOME:-/usr/local/Ascend}/driver
    if [[ -d $driver/lib64 && ":${LD_LIBRARY_PATH:-}:" != *":$driver/lib64:"* ]]; then
        export LD_LIBRARY_PATH=$driver/lib64:$driver/lib64/common:$driver/lib64/driver${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    fi
    return 0
}
_van_cann_env
unset -f _van_cann_env

# Logging: errors only, not to stdout (plog files under ~/ascend/log).
export ASCEND_SLOG_PRINT_TO_STDOUT=${ASCEND_SLOG_PRINT_TO_STDOUT:-0}
export ASCEND_GLOBAL_LOG_LEVEL=${ASCEND_GLOBAL_LOG_LEVEL:-3}
export ASCEND_GLOBAL_EVENT_ENABLE=${ASCEND_GLOBAL_EVENT_ENABLE:-0}
# Asynchronous operator dispatch (task queue); the combined/copy optimizations of the 1.x adapters.
export TASK_QUEUE_ENABLE=${TASK_QUEUE_ENABLE:-1}
export PTCOPY_ENABLE=${PTCOPY_ENABLE:-1}
export COMBINED_ENABLE=${COMBINED_ENABLE:-1}
# HCCL (the collective library of the 8-device runs): no IP whitelist, generous timeouts for the first
# step's graph compilation on all devices.
export HCCL_WHITELIST_DISABLE=${HCCL_WHITELIST_DISABLE:-1}
export HCCL_CONNECT_TIMEOUT=${HCCL_CONNECT_TIMEOUT:-1200}
export HCCL_EXEC_TIMEOUT=${HCCL_EXEC_TIMEOUT:-1200}
