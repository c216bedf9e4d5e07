# Shared by slurm/*.slurm (sourced, never run): environment defaults and the launch wiring.
#
# One srun task per node runs `accelerate launch`; the node's machine rank is $SLURM_NODEID, which only
# exists inside the srun task, so it is read there (bash -c '... "$SLURM_NODEID" ...'), never in the batch
# shell (which would give every node rank 0 and hang the rendezvous).
#
# Preemption, as measured on Debian SLURM 22.05 + accelerate 1.15 + torch 2.13:
#   - `--signal=B:USR1@T` (and `scancel --signal=USR1 --batch`) reach only this batch shell;
#   - SIGUSR1 sent to `accelerate launch` kills the launcher and does not reach its workers; SIGTERM is
#     forwarded to the workers, which then get TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds before SIGKILL;
#   - srun answers its own SIGTERM by killing the step at once ("forcing job termination"), whereas
#     `scancel --signal=TERM <job>` delivers SIGTERM to every process of the job's steps (not the batch shell).
# So the batch shell traps USR1/TERM and sends SIGTERM to the steps; the training scripts treat SIGTERM as
# "checkpoint at the next step boundary on every rank, exit 75"; the shell waits for srun, then decides:
#   finished (DONE_FILE exists, or a clean exit)           -> exit 0
#   stopped by a signal                                    -> requeue; the next run resumes from the checkpoint
#   failed with a new checkpoint since the run started     -> requeue (a node or network failure, say)
#   failed without one (bad input, a crash that repeats)   -> fail
# with at most MAX_REQUEUES requeues in all (SLURM_RESTART_COUNT counts them).

ltg_log() { echo "[ltgbert-slurm $(date '+%F %T')] $*"; }

# ------------------------------------------------------------------------------------------ environment
ltg_setup_env() {
    if [[ -n ${VENV:-} ]]; then
        # shellcheck disable=SC1091
        source "$VENV/bin/activate"
    fi
    # Processes per node: one per GPU that SLURM gave us (or, without GPU binding, that the node has).
    local gpus=${SLURM_GPUS_ON_NODE:-}
    if [[ -z $gpus ]] && command -v nvidia-smi >/dev/null 2>&1; then
        gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
    fi
    gpus=${gpus:-0}
    if [[ -z ${PROCESSES_PER_NODE:-} ]]; then
        PROCESSES_PER_NODE=$(( gpus > 0 ? gpus : 1 ))
    fi
    # DDP without GPUs: tell accelerate to use the CPU (gloo), or each process becomes a world of one.
    # Not under DeepSpeed: there the variable would silently turn the run into plain DDP.
    if (( gpus == 0 )) && ! grep -qsE "^distributed_type: *['\"]?DEEPSPEED" "${ACCELERATE_CONFIG:-/dev/null}"; then
        export ACCELERATE_USE_CPU=true
    fi
    export PROCESSES_PER_NODE
    # Split the task's CPUs between the node's processes unless the user chose a thread count.
    if [[ -z ${OMP_NUM_THREADS:-} ]]; then
        local threads=$(( ${SLURM_CPUS_PER_TASK:-1} / PROCESSES_PER_NODE ))
        export OMP_NUM_THREADS=$(( threads > 0 ? threads : 1 ))
    fi
    export TORCH_ELASTIC_SHUTDOWN_TIMEOUT NCCL_DEBUG TORCH_NCCL_ASYNC_ERROR_HANDLING
    # Python block-buffers stdout into files: without this the job log lags behind by kilobytes.
    export PYTHONUNBUFFERED=${PYTHONUNBUFFERED:-1}
}

# The run's --output_dir from the script arguments (both "--output_dir X" and "--output_dir=X"); the last one
# wins, as in argparse. Falls back to $OUTPUT_DIR (the script's default).
ltg_output_dir() {
    local out=${OUTPUT_DIR:-} prev=""
    for arg in "$@"; do
        [[ $prev == --output_dir ]] && out=$arg
        [[ $arg == --output_dir=* ]] && out=${arg#--output_dir=}
        prev=$arg
    done
    echo "$out"
}

# The newest step_XXXXXXXX checkpoint directory under <output_dir>/checkpoints (empty if none).
ltg_latest_checkpoint() {
    find "$1/checkpoints" -maxdepth 1 -name 'step_*' -type d 2>/dev/null | sort | tail -n1
}

# ------------------------------------------------------------------------------------------ launch
# ltg_launch SCRIPT DONE_FILE [script arguments...]
#   DONE_FILE, relative to the run's output directory, exists once the run has finished for good.
ltg_launch() {
    local script=$1 done_file=$2
    shift 2
    local nodes=${SLURM_NNODES:-1}
    local restarts=${SLURM_RESTART_COUNT:-0}
    # The rendezvous host: the allocation's first node, at the address SLURM itself uses to reach it
    # (NodeAddr; the same as the node name on most clusters).
    local main_host main_addr
    main_host=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
    main_addr=$(scontrol show node "$main_host" 2>/dev/null | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
    main_addr=${main_addr:-$main_host}

    local launch_args=(
        --num_machines "$nodes"
        --num_processes $(( nodes * PROCESSES_PER_NODE ))
        --main_process_ip "$main_addr"
        --main_process_port "$MAIN_PROCESS_PORT"
        --rdzv_backend static
        --max_restarts 0
        # Without this accelerate uses pdsh for multi-node DeepSpeed, which needs ssh between nodes.
        --deepspeed_multinode_launcher standard
    )
    if [[ -n ${ACCELERATE_CONFIG:-} ]]; then
        launch_args+=(--config_file "$ACCELERATE_CONFIG")
    elif (( nodes * PROCESSES_PER_NODE > 1 )); then
        launch_args+=(--multi_gpu)  # no preset: plain DDP; with ACCELERATE_USE_CPU=true it runs on gloo
    fi

    ltg_log "job ${SLURM_JOB_ID} restart ${restarts}: ${nodes} node(s) x ${PROCESSES_PER_NODE} process(es)," \
        "main ${main_host} (${main_addr}:${MAIN_PROCESS_PORT}), config '${ACCELERATE_CONFIG:-}', cpu ${ACCELERATE_USE_CPU:-false}"
    ltg_log "running: $script $*"

    # The newest checkpoint before this run: a crash is only worth a requeue if the run got further.
    local out_dir checkpoint_before
    out_dir=$(ltg_output_dir "$@")
    checkpoint_before=$(ltg_latest_checkpoint "$out_dir")

    LTG_SIGNAL=""
    LTG_SRUN_PID=""
    trap 'ltg_forward USR1' USR1
    trap 'ltg_forward TERM' TERM
    # The arguments travel as "$@" of the inner bash, so nothing is re-split or re-quoted on the nodes.
    # shellcheck disable=SC2016
    srun --nodes="$nodes" --ntasks-per-node=1 bash -c '
        echo "[ltgbert-slurm] node $SLURMD_NODENAME ($(hostname)): machine rank $SLURM_NODEID of $SLURM_NNODES"
        exec accelerate launch --machine_rank "$SLURM_NODEID" "$@"' accelerate-launch \
        "${launch_args[@]}" "$script" "$@" &
    LTG_SRUN_PID=$!
    # A signal that came before srun existed has nobody to reach yet: pass it on now.
    [[ -n $LTG_SIGNAL ]] && sleep 2 && ltg_signal_steps
    # `wait` returns early (status > 128) whenever a trapped signal arrives; keep waiting for srun itself.
    local rc=0
    wait "$LTG_SRUN_PID"
    rc=$?
    while kill -0 "$LTG_SRUN_PID" 2>/dev/null; do
        wait "$LTG_SRUN_PID"
        rc=$?
    done

    if [[ -n $out_dir && -e "$out_dir/$done_file" ]] || [[ $rc -eq 0 && -z $LTG_SIGNAL ]]; then
        ltg_log "finished (exit ${rc})"
        exit 0
    fi
    # A failure without a signal and without a new checkpoint would only repeat itself: bad input (whose exit
    # status 2 the launcher turns into 1), or a crash before the first checkpoint. Not requeued.
    if [[ -z $LTG_SIGNAL && $(ltg_latest_checkpoint "$out_dir") == "$checkpoint_before" ]]; then
        ltg_log "exit ${rc} without a new checkpoint in '${out_dir}/checkpoints': not requeued"
        exit "$rc"
    fi
    if (( restarts >= MAX_REQUEUES )); then
        ltg_log "exit ${rc}, signal '${LTG_SIGNAL}': already requeued ${restarts} times (MAX_REQUEUES); giving up"
        exit $(( rc == 0 ? 1 : rc ))
    fi
    ltg_log "exit ${rc}, signal '${LTG_SIGNAL}': requeueing (restart $(( restarts + 1 )) of at most ${MAX_REQUEUES})"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
}

# Trap handler: remember the first signal and ask every launcher and worker to checkpoint and stop.
ltg_forward() {
    [[ -n $LTG_SIGNAL ]] && return
    LTG_SIGNAL=$1
    ltg_log "received SIG$1: asking the training processes to checkpoint and stop"
    [[ -n $LTG_SRUN_PID ]] && ltg_signal_steps
}

# SIGTERM to every process of the job's steps (not this shell): the launchers pass it on to their workers.
# Not `kill -TERM <srun>`: srun answers its own SIGTERM by killing the step outright.
ltg_signal_steps() {
    scancel --signal=TERM "$SLURM_JOB_ID" 2>/dev/null
}
