#!/usr/bin/env bash
# ftjax on a SLURM GPU cluster: N nodes x G GPUs, one process per node owning all its GPUs; process 0's
# node (the first host of the nodelist) is the coordinator. Outside a job this submits itself with sbatch;
# inside one (sbatch, or salloc) it runs `srun python -m ftjax.main` on every node.
#
#   launch/gpu_slurm.sh --nodes 2 --gpus_per_node 8 [--partition P] [--time 04:00:00] [--account A]
#       [--job_name ftjax] [--port PORT] [--python PY | --venv DIR] [--log_dir DIR] [--requeue] [--dry_run]
#       -- --config=configs/X.py --workdir=/shared/run
#
# SLURM sends SIGTERM to every process 120 s before the time limit (--signal); ftjax then saves the same
# step everywhere and exits; with --requeue a requeued or resubmitted job resumes from --workdir.
#SBATCH --ntasks-per-node=1
#SBATCH --signal=TERM@120
set -euo pipefail

usage() {
  sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
  exit "${1:-0}"
}
die() { echo "gpu_slurm.sh: error: $*" >&2; exit 2; }

# Shell-quote one word so that `sh -c` (or Python's shlex.split) reads it back unchanged.
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}
quote_all() {
  local out="" word
  for word in "$@"; do out+="${out:+ }$(quote "$word")"; done
  printf '%s\n' "$out"
}
DRY_RUN=0
run() {
  if ((DRY_RUN)); then quote_all "$@"; else "$@"; fi
}

# The first host of a SLURM hostlist ('gpu[003-004,9],cpu1' -> 'gpu003'), for machines without scontrol.
first_host() {
  local list=$1 item host rest
  item=$(sed -E 's/^([^,[]*(\[[^]]*\][^,[]*)*).*/\1/' <<<"$list")
  host=""
  rest=$item
  while [[ $rest == *\[* ]]; do
    host+=${rest%%\[*}
    rest=${rest#*\[}
    local group=${rest%%\]*}
    group=${group%%,*}
    host+=${group%%-*}
    rest=${rest#*\]}
  done
  printf '%s\n' "$host$rest"
}

ORIG_ARGS=("$@")
NODES=""
GPUS=""
PARTITION=""
TIME=""
ACCOUNT=""
JOB_NAME="ftjax"
PORT=""
PYTHON="python"
LOG_DIR="logs/slurm"
REQUEUE=0
while (($#)); do
  opt=$1 val="" inline=0
  if [[ $opt == --*=* ]]; then val=${opt#*=} opt=${opt%%=*} inline=1; fi
  case $opt in
    --nodes | --gpus_per_node | --partition | --time | --account | --job_name | --port | --python | --venv | --log_dir)
      if ((!inline)); then
        if (($# < 2)) || [[ $2 == --* ]]; then die "$opt needs a value"; fi
        val=$2
        shift
      fi
      shift
      case $opt in
        --nodes) NODES=$val ;;
        --gpus_per_node) GPUS=$val ;;
        --partition) PARTITION=$val ;;
        --time) TIME=$val ;;
        --account) ACCOUNT=$val ;;
        --job_name) JOB_NAME=$val ;;
        --port) PORT=$val ;;
        --python) PYTHON=$val ;;
        --venv) PYTHON=$val/bin/python ;;
        --log_dir) LOG_DIR=$val ;;
      esac
      ;;
    --requeue) REQUEUE=1; shift ;;
    --dry_run) DRY_RUN=1; shift ;;
    -h | --help) usage 0 ;;
    --) shift; break ;;
    *) die "unknown option $1 (ftjax's own flags go after --)" ;;
  esac
done
FTJAX_ARGS=("$@")
if [[ -n $PORT ]] && { ! [[ $PORT =~ ^[0-9]+$ ]] || ((PORT < 1 || PORT > 65535)); }; then
  die "--port must be in 1..65535, got '$PORT'"
fi

if [[ -z ${SLURM_JOB_ID:-} ]]; then
  # ---- Not in a job: submit this script; sbatch runs it again inside the allocation.
  [[ $NODES =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, got '$NODES'"
  [[ $GPUS =~ ^[1-9][0-9]*$ ]] || die "--gpus_per_node must be a positive integer, got '$GPUS'"
  sbatch=(sbatch "--job-name=$JOB_NAME" "--nodes=$NODES" --ntasks-per-node=1 "--gpus-per-node=$GPUS"
          --signal=TERM@120 "--output=$LOG_DIR/%x-%j.out")
  [[ -n $PARTITION ]] && sbatch+=("--partition=$PARTITION")
  [[ -n $TIME ]] && sbatch+=("--time=$TIME")
  [[ -n $ACCOUNT ]] && sbatch+=("--account=$ACCOUNT")
  ((REQUEUE)) && sbatch+=(--requeue)
  # Options that only matter inside the job are passed on (the first --dry_run stays with this call).
  inner=()
  for a in "${ORIG_ARGS[@]}"; do [[ $a == --dry_run ]] || inner+=("$a"); done
  run mkdir -p "$LOG_DIR"
  run "${sbatch[@]}" "$(cd "$(dirname "$0")" && pwd)/$(basename "$0")" "${inner[@]}"
  exit 0
fi

# ---- Inside the job: coordinator = first host of the nodelist, one srun task per node.
nodelist=${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}
[[ -n $nodelist ]] || die "SLURM_JOB_ID is set but SLURM_JOB_NODELIST is not; run under sbatch or salloc"
if command -v scontrol >/dev/null; then
  mapfile -t hosts < <(scontrol show hostnames "$nodelist")
  head_node=${hosts[0]:-}
else
  head_node=$(first_host "$nodelist")
fi
[[ -n $head_node ]] || die "no host in SLURM nodelist '$nodelist'; run under sbatch or salloc"
nnodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
# One port per job id in the ephemeral range, as JAX's own SLURM detection picks it.
port=${PORT:-$((SLURM_JOB_ID % 4096 + 61440))}
# No --kill-on-bad-exit: after SIGTERM every process exits 143 once its part of the last checkpoint is
# written, and killing the slower ones could cut that checkpoint short. A crashed process is noticed by
# JAX's coordination service, which stops the others.
srun=(srun "--nodes=$nnodes" "--ntasks=$nnodes" --ntasks-per-node=1)
[[ -n ${SLURM_GPUS_PER_NODE:-} ]] && srun+=("--gpus-per-node=$SLURM_GPUS_PER_NODE")
# Each task reads its own rank: bash -c expands SLURM_NTASKS / SLURM_PROCID in the task, not here.
# shellcheck disable=SC2016
task='exec "$0" -m ftjax.main --coordinator_address="$1" --num_processes="$SLURM_NTASKS" --process_id="$SLURM_PROCID" "${@:2}"'
run "${srun[@]}" bash -c "$task" "$PYTHON" "$head_node:$port" "${FTJAX_ARGS[@]}"
