#!/bin/bash
# mimscale pre-training on N nodes x 8 GPUs through the `deepspeed` launcher: srun starts one launcher per
# node (no ssh/pdsh needed), each with a hostfile built from the allocation; it starts one rank per GPU.
# Same arguments and behaviour as slurm/pretrain.sh (use that one unless you want DeepSpeed's launcher):
#
#   sbatch slurm/pretrain_launcher.sh RECIPE [key=value ...]
#   sbatch --nodes=4 slurm/pretrain_launcher.sh mae_vit_l16 'data.train=/data/in1k/train-{000000..001281}.tar' \
#          train.run_dir=runs/mae_l16_in1k
#
# Quote brace patterns (as above), or your shell expands them into many data.train=... arguments.
# The config is checked once before any rank starts. About 10 minutes before the time limit SLURM sends
# USR1: the ranks save a checkpoint into train.run_dir and the job requeues itself; the next start resumes.
# --ntasks-per-node is the number of ranks per node (the hostfile's slots), as in pretrain.sh; on CPU nodes:
#   sbatch --gpus-per-node=0 --ntasks-per-node=2 --cpus-per-task=4 slurm/pretrain_launcher.sh tiny_cpu ...
#
# EDIT for your cluster: the partition and account lines below, and the environment block further down.
# Nothing else needs editing; sbatch command-line options override any #SBATCH line.
#
#SBATCH --job-name=mimscale-ds
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
# --ntasks-per-node=8 / --gpus-per-node=8: 8 ranks per node, one per A100 (the launcher assigns them).
# GPU binding: the deepspeed launcher starts every rank of a node itself and sets CUDA_VISIBLE_DEVICES to all
#   of the node's GPUs, so each rank sees them all and uses GPU = local rank (mimscale.dist.bind_device:
#   local rank % visible GPUs). One-GPU-per-task binding (--gpus-per-task=1, --gpu-bind=single:1) is for
#   srun-started ranks: use slurm/pretrain.sh for that.
# --cpus-per-task: the node's cores / 8. --mem=0 --exclusive: whole nodes. --time: at most your partition's
# limit; longer runs requeue. --signal=B:USR1@600: the warning goes to this batch shell 600 s before the
# limit. --requeue --open-mode=append: the requeued job keeps its id and appends to the same log.

# ---- EDIT: the software environment. srun passes this shell's environment to every node. -----------------
# module load cuda/12.4
# source /path/to/mimscale/.venv/bin/activate
# -----------------------------------------------------------------------------------------------------------

set -uo pipefail
say() { echo "[pretrain_launcher.sh $(date -u +%H:%M:%S)] $*"; }
if [ $# -lt 1 ]; then
    say "usage: sbatch slurm/pretrain_launcher.sh RECIPE [key=value ...]"
    exit 2
fi

# Warning signal (installed first: it may come early): forward it to the ranks, keep waiting for them.
GOT_USR1=0
STEP_PID=
INTERRUPTED=0
on_usr1() {
    GOT_USR1=1 INTERRUPTED=1
    say "USR1 (time limit near): the ranks save a checkpoint and exit"
    if [ -n "$STEP_PID" ]; then kill -USR1 "$STEP_PID" 2>/dev/null   # srun signals every process of the step
    else say "(before any rank started: --time is shorter than the --signal warning time; nothing to save)"; fi
}
on_term() {
    INTERRUPTED=1
    say "TERM: the job is being cancelled or preempted"
}
trap on_usr1 USR1
trap on_term TERM

# Defaults, each only where neither you nor the module system set it (see pretrain.sh for the reasons):
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export PYTHONUNBUFFERED=${PYTHONUNBUFFERED:-1}
export PYTHONFAULTHANDLER=${PYTHONFAULTHANDLER:-1}

MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR MASTER_PORT=$((20000 + SLURM_JOB_ID % 10000))
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE TORCHELASTIC_RUN_ID CROSS_RANK DEEPSPEED_LAUNCHER
SLOTS=${SLURM_NTASKS_PER_NODE:-$((SLURM_NTASKS / SLURM_JOB_NUM_NODES))}
SLOTS=${SLOTS%%(*}                      # "8(x2)" form on heterogeneous requests -> 8
WORLD=$((SLOTS * SLURM_JOB_NUM_NODES))

say "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $WORLD ranks = $SLURM_JOB_NUM_NODES nodes" \
    "($SLURM_JOB_NODELIST) x $SLOTS, rendezvous $MASTER_ADDR:$MASTER_PORT, $(command -v deepspeed)"
if ! python -m mimscale.cli check-config --world-size "$WORLD" "$@"; then
    say "FAILED: the run's arguments do not check out (the line above says why); no rank was started"
    exit 2
fi

# One task per node, holding all of the node's CPUs (and, inherited from the job, its GPUs). Each writes
# its own hostfile (no shared file system needed) and runs the launcher for its node rank. The launcher
# processes ignore USR1 (inherited SIG_IGN); the ranks install their own handler and save.
# shellcheck disable=SC2016  # expanded by bash -c on each node, not here
NODE_SCRIPT='
slots=$1; shift
hostfile=$(mktemp "${TMPDIR:-/tmp}/mimscale-hostfile.XXXXXX")
scontrol show hostnames "$SLURM_JOB_NODELIST" | while read -r host; do echo "$host slots=$slots"; done > "$hostfile"
trap "" USR1
deepspeed --hostfile "$hostfile" --no_ssh --node_rank "$SLURM_NODEID" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --module mimscale.train "$@"
rc=$?
rm -f "$hostfile"
exit $rc
'
srun --label --wait=120 --ntasks-per-node=1 --ntasks="$SLURM_JOB_NUM_NODES" \
    --cpus-per-task=$(( ${SLURM_CPUS_PER_TASK:-1} * SLOTS )) \
    bash -c "$NODE_SCRIPT" node-launcher "$SLOTS" "$@" &
STEP_PID=$!
rc=0
while :; do
    INTERRUPTED=0
    wait "$STEP_PID"
    r=$?
    [ "$r" -eq 127 ] && break
    rc=$r
    [ "$INTERRUPTED" = 1 ] || break
done

if [ "$rc" -eq 42 ] && [ "$GOT_USR1" = 1 ]; then
    say "the ranks saved a checkpoint (exit 42): requeueing job $SLURM_JOB_ID; it resumes from that checkpoint"
    scontrol requeue "$SLURM_JOB_ID" && exit 0
    say "FAILED: scontrol requeue did not work; submit the same command again to resume"
    exit 42
fi
say "the launchers exited with code $rc"
exit "$rc"
