#!/bin/bash
# One member of a `mimscale compare` per array task: its teachers, calibration, budgeted run and linear probe,
# each step's ranks started by srun (one rank per GPU).
#
#   mimscale compare SPEC --out DIR --slurm [--sbatch=--time=4:00:00 ...]   (writes DIR/compare.json, submits)
#   sbatch --array=0-6 slurm/compare.sh DIR                                 (the same, by hand: task I = member I)
#
# DIR must hold the plan (compare.json) and be on a file system every node sees. A task whose member is
# complete (result.json) exits at once; an interrupted one resumes from its member's last checkpoint. About
# 10 minutes before the time limit SLURM sends USR1: the member's current step saves and stops, and the task
# requeues itself (the same array task id, appending to the same log). scancel / preemption (TERM): the step
# saves, nothing is requeued; `mimscale compare --out DIR --slurm` later submits the unfinished members again.
# CPU nodes work too, e.g. --sbatch=--gpus-per-node=0 --sbatch=--ntasks-per-node=2 --sbatch=--cpus-per-task=4
#
# EDIT for your cluster: the partition and account lines below, and the environment block further down.
# Nothing else needs editing; sbatch command-line options (--sbatch=...) override any #SBATCH line.
#
#SBATCH --job-name=mimscale-compare
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%A_%a.out
##SBATCH --partition=gpu
##SBATCH --account=my-project
#
# GPU binding as in slurm/pretrain.sh: every task sees the node's GPUs (--gpus-per-node, GPU = local rank) or
#   only its own (--gpus-per-task=1 / --gpu-bind=single:1: GPU 0); mimscale.dist.bind_device handles both.
# --signal=B:USR1@600: the warning goes to this batch shell, which forwards it to `mimscale compare`, which
#   forwards it to the running step. --output=%x-%A_%a.out: one log per member (array job id _ task id).

# ---- EDIT: the software environment. srun passes this shell's environment to every rank. ----------------
# module load cuda/12.4
# source /path/to/mimscale/.venv/bin/activate
# -----------------------------------------------------------------------------------------------------------

set -uo pipefail
say() { echo "[compare.sh $(date -u +%H:%M:%S)] $*"; }
if [ $# -ne 1 ] || [ -z "${SLURM_ARRAY_TASK_ID:-}" ]; then
    say "usage: sbatch --array=0-N slurm/compare.sh DIR   (DIR from \`mimscale compare SPEC --out DIR\`)"
    exit 2
fi
TASK="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"

CHILD=
GOT_USR1=0 GOT_TERM=0 INTERRUPTED=0
on_usr1() {
    GOT_USR1=1 INTERRUPTED=1
    say "USR1 (time limit near): the member's current step saves and stops"
    [ -n "$CHILD" ] && kill -USR1 "$CHILD" 2>/dev/null
}
on_term() {  # scancel / preemption: SLURM signals the step itself; wait for the save, do not requeue
    GOT_TERM=1 INTERRUPTED=1
    say "TERM: the task is being cancelled or preempted"
}
trap on_usr1 USR1
trap on_term TERM

# One OpenMP pool of the task's own CPUs per rank; srun >= 22.05 does not pass --cpus-per-task to its steps.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
[ -n "${SLURM_CPUS_PER_TASK:-}" ] && export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
export NCCL_DEBUG=${NCCL_DEBUG:-WARN} TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export PYTHONUNBUFFERED=${PYTHONUNBUFFERED:-1} PYTHONFAULTHANDLER=${PYTHONFAULTHANDLER:-1}

# Rendezvous on the first node; the port follows from the array job and task ids (stable across requeues,
# distinct for the tasks running at the same time). Launcher variables from the submitting shell would win.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR MASTER_PORT=$((20000 + (SLURM_ARRAY_JOB_ID + SLURM_ARRAY_TASK_ID) % 10000))
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE TORCHELASTIC_RUN_ID CROSS_RANK DEEPSPEED_LAUNCHER

say "task $TASK (job $SLURM_JOB_ID, restart ${SLURM_RESTART_COUNT:-0}): member #$SLURM_ARRAY_TASK_ID of $1," \
    "$SLURM_NTASKS ranks on $SLURM_JOB_NUM_NODES nodes ($SLURM_JOB_NODELIST), rendezvous $MASTER_ADDR:$MASTER_PORT"
python -m mimscale.cli compare --out "$1" --member-index "$SLURM_ARRAY_TASK_ID" --launch srun &
CHILD=$!
rc=0
while :; do  # bash runs a trap only between commands: wait in the background, re-wait after a trap
    INTERRUPTED=0
    wait "$CHILD"
    r=$?
    [ "$r" -eq 127 ] && break  # already collected: rc holds its exit code
    rc=$r
    [ "$INTERRUPTED" = 1 ] || break
done

if [ "$rc" -eq 42 ] && [ "$GOT_USR1" = 1 ] && [ "$GOT_TERM" = 0 ]; then
    say "the member saved (exit 42): requeueing task $TASK; it resumes from that checkpoint"
    scontrol requeue "$TASK" && exit 0
    say "FAILED: scontrol requeue did not work; run \`mimscale compare --out $1 --slurm\` to resume"
fi
say "mimscale compare exited with code $rc"
exit "$rc"
