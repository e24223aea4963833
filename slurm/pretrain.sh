#!/bin/bash
# mimscale pre-training on N nodes x 8 GPUs: one rank per GPU, started by srun.
#
#   sbatch slurm/pretrain.sh RECIPE [key=value ...]
#   sbatch --nodes=4 slurm/pretrain.sh mae_vit_l16 'data.train=/data/in1k/train-{000000..001281}.tar' \
#          train.run_dir=runs/mae_l16_in1k
#
# Quote brace patterns (as above), or your shell expands them into many data.train=... arguments.
# Arguments reach mimscale as they are (an argv array, never re-parsed by a shell). The config is checked
# once before any rank starts: a bad key, recipe or data path fails the job within seconds, with the
# reason in the log. About 10 minutes before the time limit SLURM sends USR1: every rank finishes its
# step, the run saves a checkpoint into train.run_dir and the job requeues itself; the next start resumes
# from that checkpoint (keep train.run_dir the same: the default does not depend on the job).
# The same script runs on CPU nodes (the device is detected at run time), e.g.
#   sbatch --gpus-per-node=0 --ntasks-per-node=2 --cpus-per-task=4 slurm/pretrain.sh tiny_cpu ...
#
# EDIT for your cluster: the partition and account lines below, and the environment block further down.
# Nothing else needs editing; sbatch command-line options override any #SBATCH line.
#
#SBATCH --job-name=mimscale
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
##SBATCH --partition=gpu
##SBATCH --account=my-project
#
# --ntasks-per-node=8 / --gpus-per-node=8: one rank per A100; every rank sees the node's GPUs and picks
#   its own by local rank. --cpus-per-task: the node's cores / 8 (its data loader workers run inside).
# GPU binding, either style works (mimscale.dist.bind_device: GPU ordinal = local rank % visible GPUs):
#   all GPUs visible to every task (the default above): rank with local rank r uses GPU r;
#   one GPU per task: replace --gpus-per-node=8 with --gpus-per-task=1 (or keep it and add
#   --gpu-bind=single:1 / cgroup ConstrainDevices): each task sees one GPU, ordinal 0, and LOCAL_RANK is
#   re-exported as 0 for DeepSpeed. Do not mix: with --gpus-per-task, --gpu-bind=none shows every task all
#   GPUs again (then ordinal = local rank, as above).
# --mem=0 --exclusive: whole nodes. --time: at most your partition's limit; longer runs requeue.
# --signal=B:USR1@600: the warning goes to this batch shell 600 s before the limit (a ZeRO-3 save of a
#   ViT-H takes minutes; SLURM may also deliver it up to a minute early).
# --requeue --open-mode=append: the requeued job keeps its id and appends to the same %x-%j.out log.

# ---- EDIT: the software environment. srun passes this shell's environment to every rank. ----------------
# module load cuda/12.4
# source /path/to/mimscale/.venv/bin/activate
# -----------------------------------------------------------------------------------------------------------

set -uo pipefail
say() { echo "[pretrain.sh $(date -u +%H:%M:%S)] $*"; }
if [ $# -lt 1 ]; then
    say "usage: sbatch slurm/pretrain.sh RECIPE [key=value ...]"
    exit 2
fi

# Warning signal (installed first: it may come early): forward it to the ranks, keep waiting for them.
GOT_USR1=0
STEP_PID=
INTERRUPTED=0
on_usr1() {
    GOT_USR1=1 INTERRUPTED=1
    say "USR1 (time limit near): the ranks save a checkpoint and exit"
    if [ -n "$STEP_PID" ]; then kill -USR1 "$STEP_PID" 2>/dev/null
    else say "(before any rank started: --time is shorter than the --signal warning time; nothing to save)"; fi
}
GOT_TERM=0
on_term() {   # scancel / preemption: SLURM signals the ranks itself; wait for their save, do not requeue
    INTERRUPTED=1 GOT_TERM=1
    say "TERM: the job is being cancelled or preempted"
}
trap on_usr1 USR1
trap on_term TERM

# Defaults, each only where neither you nor the module system set it:
# one OpenMP thread pool of the task's own CPUs per rank (without it every rank starts one thread per
# core of the node and they oversubscribe it);
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
# NCCL warnings (e.g. "no InfiniBand, falling back to sockets") without the INFO flood;
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# a failed or timed-out collective aborts the rank (and so the job) instead of hanging until the time limit;
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# log lines reach the log file as they happen; a hard crash prints every thread's Python stack.
export PYTHONUNBUFFERED=${PYTHONUNBUFFERED:-1}
export PYTHONFAULTHANDLER=${PYTHONFAULTHANDLER:-1}

# Rendezvous from the allocation: the first node hosts it, the port follows from the job id (stable
# across requeues). Launcher variables inherited from the submitting shell would override SLURM's.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR MASTER_PORT=$((20000 + SLURM_JOB_ID % 10000))
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE TORCHELASTIC_RUN_ID CROSS_RANK DEEPSPEED_LAUNCHER

say "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $SLURM_NTASKS ranks on $SLURM_JOB_NUM_NODES nodes" \
    "($SLURM_JOB_NODELIST), rendezvous $MASTER_ADDR:$MASTER_PORT, $(python --version 2>&1) at $(command -v python)"
if ! python -m mimscale.cli check-config --world-size "$SLURM_NTASKS" "$@"; then
    say "FAILED: the run's arguments do not check out (the line above says why); no rank was started"
    exit 2
fi

# --wait=120: once one rank has exited, the others get 2 minutes, then the step is killed (a crashed rank
#   does not leave the rest hanging in a collective; rank 0 still has time to finish writing its logs).
step_opts=(--label --wait=120)
[ -n "${SLURM_CPUS_PER_TASK:-}" ] && step_opts+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")  # srun >= 22.05 does not inherit it
srun "${step_opts[@]}" python -m mimscale.train "$@" &
STEP_PID=$!
rc=0
while :; do    # bash runs a trap only between commands: wait in the background, re-wait after a trap
    INTERRUPTED=0
    wait "$STEP_PID"
    r=$?
    [ "$r" -eq 127 ] && break          # already collected: rc holds its exit code
    rc=$r
    [ "$INTERRUPTED" = 1 ] || break
done

if [ "$rc" -eq 42 ] && [ "$GOT_USR1" = 1 ]; then
    say "the ranks saved a checkpoint (exit 42): requeueing job $SLURM_JOB_ID; it resumes from that checkpoint"
    scontrol requeue "$SLURM_JOB_ID" && exit 0
    say "FAILED: scontrol requeue did not work; submit the same command again to resume"
    exit 42
fi
# A rank killed by a signal (its node was lost, the OOM killer, SIGKILL): srun ends the others (a collective with a
# dead peer fails; --wait above) and reports 128 + the signal. Requeue: the next start resumes from the last
# checkpoint and redoes the steps after it. At most MIMSCALE_MAX_CRASH_REQUEUES (default 3) times per job, so a
# rank that dies every time does not loop forever; never after scancel/preemption (TERM).
crashes_file="${SLURM_SUBMIT_DIR:-.}/.mimscale-job-$SLURM_JOB_ID.crash-requeues"
if [ "$rc" -ge 128 ] && [ "$GOT_TERM" = 0 ]; then
    crashes=$(cat "$crashes_file" 2>/dev/null || echo 0)
    if [ "$crashes" -lt "${MIMSCALE_MAX_CRASH_REQUEUES:-3}" ]; then
        echo $((crashes + 1)) > "$crashes_file"
        say "a rank was killed (exit $rc = signal $((rc - 128))): requeueing job $SLURM_JOB_ID (crash requeue" \
            "$((crashes + 1)) of ${MIMSCALE_MAX_CRASH_REQUEUES:-3}); it resumes from the last checkpoint"
        scontrol requeue "$SLURM_JOB_ID" && exit 0
        say "FAILED: scontrol requeue did not work; submit the same command again to resume"
    else
        say "a rank was killed again (exit $rc); not requeueing after $crashes crash requeues"
    fi
fi
rm -f "$crashes_file"
say "the ranks exited with code $rc"
exit "$rc"
