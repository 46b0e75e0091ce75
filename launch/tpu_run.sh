#!/usr/bin/env bash
# Starts (or stops) the same cots_jax.main command on every worker of a TPU VM. See --help.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# On each worker, relative to REMOTE_DIR: the pid of the run it started and its own log (the
# $(hostname) expands there).
PID_FILE="logs/main.pid"
# shellcheck disable=SC2016
LOG_FILE='logs/main-$(hostname).log'

usage() {
  cat <<'EOF'
Usage: launch/tpu_run.sh --name=NAME --zone=ZONE --config=CONFIG --workdir=gs://BUCKET/DIR
                         [options] [-- MORE_MAIN_FLAGS...]
       launch/tpu_run.sh --name=NAME --zone=ZONE --stop

Starts, on every worker (--worker=all) of TPU VM NAME, in the background under nohup and with
JAX_PLATFORMS unset:
  .venv/bin/python -m cots_jax.main --config=CONFIG --workdir=WORKDIR --multihost MORE_MAIN_FLAGS
in REMOTE_DIR (set up by launch/tpu_setup.sh). --multihost starts jax.distributed, which finds the
other workers of the slice by itself. Each worker appends its output to its own log file
REMOTE_DIR/logs/main-<hostname>.log. A worker whose previous run is still going refuses to
start another.

Required:
  --name=NAME           TPU VM name
  --zone=ZONE           its zone
  --config=CONFIG       config, relative to REMOTE_DIR, e.g. configs/pretrain.py:model=base
  --workdir=gs://...    run directory; it must be on gs:// because every worker writes and
                        restores the same checkpoints (use a bucket in the TPU's region)
Options:
  --project=PROJECT     GCP project (default: gcloud's configured project)
  --remote-dir=DIR      code directory on the workers, relative to home (default cots_jax)
  --stop                send SIGTERM to the runs this script started: each saves a checkpoint
                        at the current step and exits (resume by starting again)
  --dry-run             print the commands, one per line after '+ ', and run none
  -h, --help            show this help
  -- MORE_MAIN_FLAGS    passed to cots_jax.main as they are, e.g. -- --config.total_steps=1000

Example:
  launch/tpu_run.sh --name=cots --zone=us-west4-a --config=configs/pretrain.py:model=base \
    --workdir=gs://my-bucket/cots/base-1 -- --config.checkpoint_every=1000
EOF
}

start_command() {
  # Remote shell command: start cots_jax.main detached from the ssh session (nohup, all three
  # standard streams redirected, so that ssh returns) unless this worker's last run still lives.
  local main=(env -u JAX_PLATFORMS .venv/bin/python -m cots_jax.main "--config=$CONFIG"
    "--workdir=$WORKDIR" --multihost ${PASSTHROUGH_ARGS[@]+"${PASSTHROUGH_ARGS[@]}"})
  printf '%s' "set -e; cd $(quote_word "$REMOTE_DIR"); mkdir -p logs;" \
    " if [ -f $PID_FILE ] && kill -0 \"\$(cat $PID_FILE)\" 2>/dev/null; then" \
    " echo \"\$(hostname): cots_jax.main still runs (pid \$(cat $PID_FILE));" \
    " stop it first with launch/tpu_run.sh --stop\" >&2; exit 1; fi;" \
    " nohup $(quote_command "${main[@]}") >> $LOG_FILE 2>&1 < /dev/null &" \
    " echo \$! > $PID_FILE; echo \"\$(hostname): started cots_jax.main, pid \$!, log $LOG_FILE\""
}

stop_command() {
  # Remote shell command: SIGTERM to the run that start_command left in this worker's pid file.
  printf '%s' "cd $(quote_word "$REMOTE_DIR") &&" \
    " if [ -f $PID_FILE ] && kill -TERM \"\$(cat $PID_FILE)\" 2>/dev/null; then" \
    " echo \"\$(hostname): sent SIGTERM to cots_jax.main (pid \$(cat $PID_FILE))\";" \
    " else echo \"\$(hostname): cots_jax.main is not running\"; fi"
}

CONFIG=""
WORKDIR=""
REMOTE_DIR="cots_jax"
STOP=0
VALUE_FLAGS=("${TPU_VALUE_FLAGS[@]}" config:CONFIG workdir:WORKDIR remote-dir:REMOTE_DIR)
SWITCH_FLAGS=(stop:STOP)
ALLOW_PASSTHROUGH=1
parse_flags "$@"
set_gcloud_scope
if ((STOP)); then
  require_flags name zone remote-dir
  tpu_ssh_all "$(stop_command)"
  exit 0
fi
require_flags name zone config workdir remote-dir
if [[ "$WORKDIR" != gs://?* ]]; then
  usage_error "--workdir must be a gs:// path, got '$WORKDIR': every worker writes and" \
    "restores the same checkpoints, so they need one shared bucket"
fi
tpu_ssh_all "$(start_command)"
