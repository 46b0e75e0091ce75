#!/usr/bin/env bash
# Deletes a TPU VM (and its queued resource), after asking. See --help.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
Usage: launch/tpu_delete.sh --name=NAME --zone=ZONE [--queued] [--yes] [options]

Deletes TPU VM NAME (every worker, with its disks and whatever runs on it). The run's
checkpoints and metrics on gs:// stay. Asks for confirmation on stdin unless --yes.

Required:
  --name=NAME           TPU VM name
  --zone=ZONE           its zone
Options:
  --project=PROJECT     GCP project (default: gcloud's configured project)
  --queued              it was made with tpu_create.sh --queued: delete the queued resource NAME
                        and, with it, its TPU VM
  --yes                 do not ask
  --dry-run             print the commands, one per line after '+ ', and run none
  -h, --help            show this help
USAGE
}

confirm() {
  # Asks the question $1 on stderr; fails unless the answer on stdin is y or yes.
  local answer=""
  printf '%s [y/N] ' "$1" >&2
  read -r answer || true
  if [[ ! "$answer" =~ ^[Yy]([Ee][Ss])?$ ]]; then
    fail "not deleted"
  fi
}

QUEUED=0
YES=0
VALUE_FLAGS=("${TPU_VALUE_FLAGS[@]}")
SWITCH_FLAGS=(queued:QUEUED yes:YES)
parse_flags "$@"
require_flags name zone
set_gcloud_scope
if ((QUEUED)); then
  what="queued resource $NAME and its TPU VM"
  delete=(gcloud compute tpus queued-resources delete "$NAME" "${GCLOUD_SCOPE[@]}" --force --quiet)
else
  what="TPU VM $NAME"
  delete=(gcloud compute tpus tpu-vm delete "$NAME" "${GCLOUD_SCOPE[@]}" --quiet)
fi
if ((!YES && !DRY_RUN)); then
  confirm "Delete the $what in zone $ZONE${PROJECT:+ of project $PROJECT}?"
fi
run "${delete[@]}"
