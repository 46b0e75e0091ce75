#!/usr/bin/env bash
# Puts the code on every worker of a TPU VM and installs it into a venv. See --help.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# What `pip install -e .` and `python -m cots_jax.main --config=configs/...` need on a worker.
PACKAGE_PATHS=(setup.cfg pyproject.toml README.md cots_jax configs)

usage() {
  cat <<'EOF'
Usage: launch/tpu_setup.sh --name=NAME --zone=ZONE [options]

On every worker (--worker=all) of TPU VM NAME: puts the code into REMOTE_DIR (a git clone or
pull of --repo, else a copy of this checkout's package files), creates the venv REMOTE_DIR/.venv
with PYTHON (apt-installed when missing), runs pip install -e '.[tpu]' and checks that JAX sees
the TPU. Run it again after changing the code; the venv is reused.

Required:
  --name=NAME           TPU VM name
  --zone=ZONE           its zone
Options:
  --project=PROJECT     GCP project (default: gcloud's configured project)
  --repo=URL            git URL to clone (or pull, when REMOTE_DIR is a clone already);
                        default: copy setup.cfg, pyproject.toml, README.md, cots_jax/, configs/
                        from this checkout with gcloud compute tpus tpu-vm scp
  --branch=BRANCH       branch or tag to check out with --repo (default: the remote's default)
  --remote-dir=DIR      code directory on the workers, relative to home (default cots_jax)
  --python=PYTHON       interpreter for the venv (default python3.11, as setup.cfg requires)
  --dry-run             print the commands, one per line after '+ ', and run none
  -h, --help            show this help
EOF
}

clone_or_pull_command() {
  # Remote shell command: clone $REPO into $REMOTE_DIR, or bring an existing clone up to date.
  local dir url branch
  dir="$(quote_word "$REMOTE_DIR")"
  url="$(quote_word "$REPO")"
  if [[ -z "$BRANCH" ]]; then
    printf '%s' "set -e; if [ -d $dir/.git ]; then git -C $dir pull --ff-only;" \
      " else git clone $url $dir; fi"
  else
    branch="$(quote_word "$BRANCH")"
    printf '%s' "set -e; if [ -d $dir/.git ]; then git -C $dir fetch origin $branch;" \
      " git -C $dir checkout $branch; git -C $dir merge --ff-only FETCH_HEAD;" \
      " else git clone --branch $branch $url $dir; fi"
  fi
}

install_command() {
  # Remote shell command: venv with $PYTHON in $REMOTE_DIR/.venv, editable install with the
  # TPU extra, and a check that JAX sees the slice (it starts jax.distributed on every worker).
  local python
  python="$(quote_word "$PYTHON")"
  printf '%s' "set -e; if ! command -v $python >/dev/null 2>&1; then" \
    " sudo apt-get -o DPkg::Lock::Timeout=300 update -q;" \
    " sudo apt-get -o DPkg::Lock::Timeout=300 install -y -q $python $python-venv; fi;" \
    " cd $(quote_word "$REMOTE_DIR"); $python -m venv .venv;" \
    ' .venv/bin/pip install -q --upgrade pip; .venv/bin/pip install -q -e ".[tpu]";' \
    ' .venv/bin/python -c "import jax; jax.distributed.initialize();' \
    ' print(f\"jax process {jax.process_index()}: {jax.device_count()} devices\")"'
}

REPO=""
BRANCH=""
REMOTE_DIR="cots_jax"
PYTHON="python3.11"
VALUE_FLAGS=("${TPU_VALUE_FLAGS[@]}" repo:REPO branch:BRANCH remote-dir:REMOTE_DIR python:PYTHON)
parse_flags "$@"
require_flags name zone remote-dir python
if [[ -n "$BRANCH" && -z "$REPO" ]]; then
  usage_error "--branch needs --repo (without it this checkout is copied as it is)"
fi
set_gcloud_scope

if [[ -n "$REPO" ]]; then
  tpu_ssh_all "$(clone_or_pull_command)"
else
  sources=()
  for path in "${PACKAGE_PATHS[@]}"; do
    sources+=("$REPO_ROOT/$path")
  done
  tpu_ssh_all "mkdir -p $(quote_word "$REMOTE_DIR")"
  run gcloud compute tpus tpu-vm scp --recurse "${sources[@]}" "$NAME:$REMOTE_DIR" \
    "${GCLOUD_SCOPE[@]}" --worker=all
fi
tpu_ssh_all "$(install_command)"
