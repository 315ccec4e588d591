#!/usr/bin/env bash
# ftjax on a Cloud TPU VM slice: create it (optionally spot/preemptible, optionally as a queued resource),
# put this checkout on every worker, install jax[tpu] + ftjax, run the same `python3 -m ftjax.main` on all
# workers (JAX finds its peers from the VM metadata) streaming their logs, then delete the slice.
#
#   launch/tpu_vm.sh [all|plan|create|setup|run|delete] --name N --zone Z [--type v5litepod-16] [--project P]
#       [--version RUNTIME] [--spot | --preemptible] [--queued] [--git URL [--ref REF]] [--jax_version V]
#       [--keep] [--skip_plan] [--dry_run] -- --config=configs/X.py --workdir=gs://BUCKET/run
#
# all (default) = plan, create, setup, run, then delete (unless --keep; also after a failure or Ctrl-C). plan
# compiles the fine-tune here, for --type's TPU topology (ftjax --mode=dry_run --topology, through libtpu:
# needs ftjax and libtpu installed locally), and stops with its line when it does not fit, before any VM
# exists (--skip_plan skips it). setup copies this checkout (or clones --git). The workdir must be shared by
# all workers (a gs:// path); rerunning the same command after a preemption resumes from it.
set -euo pipefail

usage() {
  sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
  exit "${1:-0}"
}
die() { echo "tpu_vm.sh: error: $*" >&2; exit 2; }

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
DRY_RUN=0
run() {
  if ((DRY_RUN)); then quote_all "$@"; echo; else "$@"; fi
}

ACTION=all
case ${1:-} in
  all | plan | create | setup | run | delete) ACTION=$1; shift ;;
esac
NAME=""
ZONE=""
TYPE="v5litepod-8"
PROJECT=""
VERSION=""
GIT=""
REF=""
JAX_VERSION=""
SPOT=0
PREEMPTIBLE=0
QUEUED=0
KEEP=0
SKIP_PLAN=0
while (($#)); do
  opt=$1 val="" inline=0
  if [[ $opt == --*=* ]]; then val=${opt#*=} opt=${opt%%=*} inline=1; fi
  case $opt in
    --name | --zone | --type | --project | --version | --git | --ref | --jax_version)
      if ((!inline)); then
        if (($# < 2)) || [[ $2 == --* ]]; then die "$opt needs a value"; fi
        val=$2
        shift
      fi
      shift
      case $opt in
        --name) NAME=$val ;;
        --zone) ZONE=$val ;;
        --type) TYPE=$val ;;
        --project) PROJECT=$val ;;
        --version) VERSION=$val ;;
        --git) GIT=$val ;;
        --ref) REF=$val ;;
        --jax_version) JAX_VERSION=$val ;;
      esac
      ;;
    --spot) SPOT=1; shift ;;
    --preemptible) PREEMPTIBLE=1; shift ;;
    --queued) QUEUED=1; shift ;;
    --keep) KEEP=1; shift ;;
    --skip_plan) SKIP_PLAN=1; shift ;;
    --dry_run) DRY_RUN=1; shift ;;
    -h | --help) usage 0 ;;
    --) shift; break ;;
    *) die "unknown option $1 (ftjax's own flags go after --)" ;;
  esac
done
FTJAX_ARGS=("$@")

[[ -n $NAME ]] || die "--name is required (the TPU VM's name)"
[[ -n $ZONE ]] || die "--zone is required (e.g. --zone us-west4-a)"
((SPOT && PREEMPTIBLE)) && die "--spot and --preemptible exclude each other; pick one"
((QUEUED && PREEMPTIBLE)) && die "--queued with --preemptible is not offered by gcloud; use --queued --spot"
if [[ -z $VERSION ]]; then
  # The runtime image that goes with each TPU generation (override with --version).
  case $TYPE in
    v2-* | v3-* | v4-*) VERSION=tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) VERSION=v2-alpha-tpuv5 ;;
    v6e-*) VERSION=v2-alpha-tpuv6e ;;
    *) die "no default runtime image for --type $TYPE; pass --version (see gcloud compute tpus versions list)" ;;
  esac
fi
if [[ $ACTION == all || $ACTION == run || $ACTION == plan ]] && ((${#FTJAX_ARGS[@]} == 0)); then
  die "nothing to run: put ftjax's flags after --, e.g. -- --config=configs/X.py --workdir=gs://B/run"
fi

common=("--zone=$ZONE")
keep_args=(--name "$NAME" --zone "$ZONE")
((QUEUED)) && keep_args+=(--queued)
[[ -n $PROJECT ]] && keep_args+=(--project "$PROJECT")
[[ -n $PROJECT ]] && common+=("--project=$PROJECT")
ssh_all=(gcloud compute tpus tpu-vm ssh "$NAME" "${common[@]}" --worker=all)
jax_spec="jax[tpu]${JAX_VERSION:+==$JAX_VERSION}"

plan() {
  # The same config compiled ahead of time for this slice, on this machine; the plan's own folder keeps
  # dry_run.json (the run's workdir is left alone: it may be a gs:// path this machine cannot write).
  local args=() arg plan_dir="${TMPDIR:-/tmp}/ftjax-plan-$NAME"
  for arg in "${FTJAX_ARGS[@]}"; do
    case $arg in
      --workdir=* | --mode=* | --topology=*) ;;
      *) args+=("$arg") ;;
    esac
  done
  local cmd=(python3 -m ftjax.main --mode=dry_run "--topology=$TYPE" "--workdir=$plan_dir" "${args[@]}")
  if ((DRY_RUN)); then
    run "${cmd[@]}"
    return
  fi
  python3 -c "import ftjax" 2>/dev/null \
    || die "plan: ftjax is not importable here (pip install -e '.[plan]' in this checkout), or pass --skip_plan"
  echo "tpu_vm.sh: planning the fine-tune for $TYPE here before creating anything: $(quote_all "${cmd[@]}")" >&2
  "${cmd[@]}" || die "plan failed (above); fix the config, or pass --skip_plan to launch anyway"
  local verdict
  verdict=$(python3 - "$plan_dir/dry_run.json" <<'PY'
import json, sys
plan = json.load(open(sys.argv[1]))
print("fits" if plan["fits"] is not False else "no", plan.get("suggestion") or "")
PY
) || die "plan: no readable $plan_dir/dry_run.json"
  if [[ $verdict != fits* ]]; then
    die "the fine-tune does not fit $TYPE (plan: $plan_dir/dry_run.json): ${verdict#no }"
  fi
  echo "tpu_vm.sh: the plan fits $TYPE ($plan_dir/dry_run.json)" >&2
}

create() {
  if ((QUEUED)); then
    local cmd=(gcloud compute tpus queued-resources create "$NAME" "--node-id=$NAME" "${common[@]}"
               "--accelerator-type=$TYPE" "--runtime-version=$VERSION")
    ((SPOT)) && cmd+=(--spot)
    run "${cmd[@]}"
    # A queued resource waits for capacity: poll until its node is ACTIVE.
    local describe=(gcloud compute tpus queued-resources describe "$NAME" "${common[@]}" "--format=value(state.state)")
    if ((DRY_RUN)); then
      run "${describe[@]}"
      return
    fi
    local state
    while :; do
      state=$("${describe[@]}")
      echo "tpu_vm.sh: queued resource $NAME is $state"
      case $state in
        ACTIVE) break ;;
        FAILED | SUSPENDED | SUSPENDING) die "queued resource $NAME is $state; see: ${describe[*]:0:6} --zone=$ZONE" ;;
      esac
      sleep 30
    done
  else
    local cmd=(gcloud compute tpus tpu-vm create "$NAME" "${common[@]}" "--accelerator-type=$TYPE" "--version=$VERSION")
    ((SPOT)) && cmd+=(--spot)
    ((PREEMPTIBLE)) && cmd+=(--preemptible)
    run "${cmd[@]}"
  fi
}

setup() {
  local install fetch
  install="cd ~/ftjax && python3 -m pip install -q -U pip && python3 -m pip install -q -e . $(quote "$jax_spec")"
  if [[ -n $GIT ]]; then
    fetch="rm -rf ~/ftjax && git clone -q $(quote "$GIT") ~/ftjax"
    [[ -n $REF ]] && fetch+=" && git -C ~/ftjax checkout -q $(quote "$REF")"
    run "${ssh_all[@]}" "--command=set -e; $fetch && $install"
  else
    # This checkout (uncommitted changes included), without the venv, git data and caches.
    local repo tarball
    repo=$(cd "$(dirname "$0")/.." && pwd)
    tarball="${TMPDIR:-/tmp}/ftjax-$NAME.tar.gz"
    run tar -czf "$tarball" -C "$repo" --exclude=./.venv --exclude=./.git --exclude=__pycache__ \
      --exclude=./logs .
    run gcloud compute tpus tpu-vm scp "$tarball" "$NAME:ftjax.tar.gz" "${common[@]}" --worker=all
    run "${ssh_all[@]}" "--command=set -e; rm -rf ~/ftjax && mkdir -p ~/ftjax && tar -xzf ~/ftjax.tar.gz -C ~/ftjax && $install"
  fi
}

run_ftjax() {
  # Every worker runs the same command; each worker's output streams here (and stays in ~/ftjax-run.log).
  local args
  args=$(quote_all "${FTJAX_ARGS[@]}")
  run "${ssh_all[@]}" "--command=set -o pipefail; cd ~/ftjax && PYTHONUNBUFFERED=1 python3 -m ftjax.main $args 2>&1 | tee ~/ftjax-run.log"
}

delete() {
  if ((QUEUED)); then
    run gcloud compute tpus queued-resources delete "$NAME" "${common[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$NAME" "${common[@]}" --quiet
  fi
}

delete_on_exit() {
  local rc=$?
  trap - EXIT
  delete || true
  exit "$rc"
}

case $ACTION in
  plan) plan ;;
  create) create ;;
  setup) setup ;;
  run) run_ftjax ;;
  delete) delete ;;
  all)
    ((SKIP_PLAN)) || plan
    create
    if ((KEEP)); then
      echo "tpu_vm.sh: keeping $NAME; delete it with: $(quote_all "$0" delete "${keep_args[@]}")" >&2
    else
      # Whatever happens from here (failure, Ctrl-C), the slice is deleted; the exit status is kept.
      trap delete_on_exit EXIT
    fi
    setup
    run_ftjax
    ;;
esac
