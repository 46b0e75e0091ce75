#!/usr/bin/env bash
# Creates a Cloud TPU VM slice, directly or through a queued resource. See --help.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/tpu_create.sh --name=NAME --zone=ZONE --accelerator-type=TYPE [options]

Creates a Cloud TPU VM slice (every worker of it) with gcloud.

Required:
  --name=NAME               TPU VM name (also the queued-resource id with --queued)
  --zone=ZONE               zone that offers the accelerator, e.g. us-west4-a, us-central2-b
  --accelerator-type=TYPE   e.g. v5litepod-256, v4-128, v5p-128, v6e-256
Options:
  --version=RUNTIME         TPU software version; default by family: v6e v2-alpha-tpuv6e,
                            v5p v2-alpha-tpuv5, v5e v2-alpha-tpuv5-lite, else tpu-ubuntu2204-base
  --project=PROJECT         GCP project (default: gcloud's configured project)
  --spot                    Spot capacity: cheaper, preemptible at any time
  --reserved                capacity from your project's reservation
                            (neither --spot nor --reserved: on-demand)
  --queued                  ask through a queued resource and wait until it is ACTIVE
  --poll-seconds=N          seconds between state checks with --queued (default 60)
  --dry-run                 print the commands, one per line after '+ ', and run none
  -h, --help                show this help

Example:
  launch/tpu_create.sh --name=cots --zone=us-west4-a --accelerator-type=v5litepod-256 \
    --spot --queued
EOF
}

default_runtime_version() {
  # The TPU software version Cloud TPU recommends for JAX on accelerator type $1.
  case "$1" in
    v6e-*) printf 'v2-alpha-tpuv6e' ;;
    v5p-*) printf 'v2-alpha-tpuv5' ;;
    v5litepod-* | v5e-*) printf 'v2-alpha-tpuv5-lite' ;;
    *) printf 'tpu-ubuntu2204-base' ;;
  esac
}

wait_until_active() {
  # Polls the queued resource $NAME until it is ACTIVE; fails on a state it cannot leave.
  local state describe=(gcloud compute tpus queued-resources describe "$NAME" "${GCLOUD_SCOPE[@]}"
    '--format=value(state.state)')
  if ((DRY_RUN)); then
    show_command "${describe[@]}"
    return 0
  fi
  show_command "${describe[@]}" >&2
  while true; do
    state="$("${describe[@]}")"
    printf '%s: queued resource %s is %s\n' "$SCRIPT_NAME" "$NAME" "${state:-(no state yet)}" >&2
    case "$state" in
      ACTIVE) return 0 ;;
      FAILED | SUSPENDING | SUSPENDED | DELETING)
        fail "queued resource $NAME is $state ('gcloud compute tpus queued-resources describe'" \
          "says why); free it with launch/tpu_delete.sh --queued"
        ;;
      *) ;; # on its way: ACCEPTED, WAITING_FOR_RESOURCES, PROVISIONING, ...
    esac
    sleep "$POLL_SECONDS"
  done
}

ACCELERATOR_TYPE=""
VERSION=""
POLL_SECONDS=60
SPOT=0
RESERVED=0
QUEUED=0
VALUE_FLAGS=("${TPU_VALUE_FLAGS[@]}" accelerator-type:ACCELERATOR_TYPE version:VERSION
  poll-seconds:POLL_SECONDS)
SWITCH_FLAGS=(spot:SPOT reserved:RESERVED queued:QUEUED)
parse_flags "$@"
require_flags name zone accelerator-type
if ((SPOT && RESERVED)); then
  usage_error "--spot and --reserved exclude each other"
fi
if [[ ! "$POLL_SECONDS" =~ ^[0-9]+$ ]]; then
  usage_error "--poll-seconds takes whole seconds, got '$POLL_SECONDS'"
fi
VERSION="${VERSION:-$(default_runtime_version "$ACCELERATOR_TYPE")}"
set_gcloud_scope
PROVISIONING=()
if ((SPOT)); then
  PROVISIONING=(--spot)
elif ((RESERVED)); then
  PROVISIONING=(--reserved)
fi

if ((QUEUED)); then
  run gcloud compute tpus queued-resources create "$NAME" --node-id "$NAME" "${GCLOUD_SCOPE[@]}" \
    --accelerator-type "$ACCELERATOR_TYPE" --runtime-version "$VERSION" \
    ${PROVISIONING[@]+"${PROVISIONING[@]}"}
  wait_until_active
else
  run gcloud compute tpus tpu-vm create "$NAME" "${GCLOUD_SCOPE[@]}" \
    --accelerator-type "$ACCELERATOR_TYPE" --version "$VERSION" \
    ${PROVISIONING[@]+"${PROVISIONING[@]}"}
fi
