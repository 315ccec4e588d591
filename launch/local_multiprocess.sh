#!/usr/bin/env bash
# N ftjax processes on this machine's CPU, joined over loopback (gloo collectives): the multi-host code
# path without a cluster. Waits for all; exits non-zero if any fails (and stops the others). One log each.
#
#   launch/local_multiprocess.sh --num_processes 2 --cpu_devices 2 [--port P] [--log_dir DIR] \
#       [--python PY] [--dry_run] -- --config=configs/X.py --workdir=/tmp/run
set -euo pipefail

usage() {
  sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'
  exit "${1:-0}"
}
die() { echo "local_multiprocess.sh: error: $*" >&2; exit 2; }

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
  printf '%s' "$out"
}

NUM_PROCESSES=""
CPU_DEVICES=1
PORT=""
LOG_DIR="${TMPDIR:-/tmp}/ftjax_local_multiprocess"
PYTHON="${PYTHON:-python}"
DRY_RUN=0
while (($#)); do
  opt=$1 val="" inline=0
  if [[ $opt == --*=* ]]; then val=${opt#*=} opt=${opt%%=*} inline=1; fi
  case $opt in
    --num_processes | --cpu_devices | --port | --log_dir | --python)
      if ((!inline)); then
        if (($# < 2)) || [[ $2 == --* ]]; then die "$opt needs a value"; fi
        val=$2
        shift
      fi
      shift
      case $opt in
        --num_processes) NUM_PROCESSES=$val ;;
        --cpu_devices) CPU_DEVICES=$val ;;
        --port) PORT=$val ;;
        --log_dir) LOG_DIR=$val ;;
        --python) PYTHON=$val ;;
      esac
      ;;
    --dry_run) DRY_RUN=1; shift ;;
    -h | --help) usage 0 ;;
    --) shift; break ;;
    *) die "unknown option $1 (ftjax's own flags go after --)" ;;
  esac
done
FTJAX_ARGS=("$@")

[[ $NUM_PROCESSES =~ ^[1-9][0-9]*$ ]] || die "--num_processes must be a positive integer, got '$NUM_PROCESSES'"
[[ $CPU_DEVICES =~ ^[1-9][0-9]*$ ]] || die "--cpu_devices must be a positive integer, got '$CPU_DEVICES'"
if [[ -z $PORT ]]; then
  # A random port in 20000-59999 that nothing listens on (checked with bash's /dev/tcp).
  for _ in $(seq 50); do
    PORT=$((20000 + RANDOM % 40000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then break; fi
  done
fi
if ! [[ $PORT =~ ^[0-9]+$ ]] || ((PORT < 1 || PORT > 65535)); then die "--port must be in 1..65535, got '$PORT'"; fi

commands=()  # one shell line per process
for ((i = 0; i < NUM_PROCESSES; i++)); do
  cmd=(env JAX_PLATFORMS=cpu "$PYTHON" -m ftjax.main "--coordinator_address=127.0.0.1:$PORT"
       "--num_processes=$NUM_PROCESSES" "--process_id=$i" "--cpu_devices=$CPU_DEVICES" "${FTJAX_ARGS[@]}")
  commands+=("$(quote_all "${cmd[@]}") > $(quote "$LOG_DIR/process_$i.log") 2>&1 &")
done

if ((DRY_RUN)); then
  quote_all mkdir -p "$LOG_DIR"
  echo
  printf '%s\n' "${commands[@]}"
  exit 0
fi

mkdir -p "$LOG_DIR"
pids=()
for ((i = 0; i < NUM_PROCESSES; i++)); do
  env JAX_PLATFORMS=cpu "$PYTHON" -m ftjax.main "--coordinator_address=127.0.0.1:$PORT" \
    "--num_processes=$NUM_PROCESSES" "--process_id=$i" "--cpu_devices=$CPU_DEVICES" "${FTJAX_ARGS[@]}" \
    >"$LOG_DIR/process_$i.log" 2>&1 &
  pids+=($!)
done
echo "local_multiprocess.sh: $NUM_PROCESSES processes x $CPU_DEVICES CPU devices, coordinator 127.0.0.1:$PORT," \
  "logs in $LOG_DIR/process_*.log"

stop_all() { kill -TERM "${pids[@]}" 2>/dev/null || true; }
# SIGTERM/SIGINT to this script reach every process (each saves a checkpoint at the same step and exits).
trap stop_all TERM INT

# As soon as one process fails, the others are stopped (they would wait on collectives forever); the
# exit status is the first failure's.
status=0
while [[ -n $(jobs -rp) ]]; do
  rc=0
  wait -n || rc=$?
  if ((rc != 0)); then
    if ((status == 0)); then status=$rc; fi
    stop_all
  fi
done

for ((i = 0; i < NUM_PROCESSES; i++)); do
  rc=0
  wait "${pids[i]}" || rc=$?
  if ((rc != 0)); then
    echo "local_multiprocess.sh: process $i exited with status $rc; the end of $LOG_DIR/process_$i.log:" >&2
    tail -n 20 "$LOG_DIR/process_$i.log" >&2 || true
    if ((status == 0)); then status=$rc; fi
  fi
done
exit "$status"
