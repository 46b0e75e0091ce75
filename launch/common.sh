# shellcheck shell=bash
# Helpers sourced by the launch/ scripts: flag parsing, errors, and `run`, which prints a command
# (and only prints it under --dry-run). Written for bash 3.2+ (macOS's /bin/bash): no associative
# arrays, and possibly empty arrays are expanded as ${a[@]+"${a[@]}"} for `set -u`.
#
# A script defines `usage` (prints its --help), fills the spec arrays below with "flag-name:VAR"
# entries, then calls `parse_flags "$@"`. Every script gets --help and --dry-run (DRY_RUN=1).
#   VALUE_FLAGS        flags that take a value, given as --flag=VALUE or --flag VALUE
#   SWITCH_FLAGS       flags without a value; they set VAR=1
#   ALLOW_PASSTHROUGH  1: the words after a bare `--` go to PASSTHROUGH_ARGS (else an error)

SCRIPT_NAME="${SCRIPT_NAME:-$(basename "$0")}"
DRY_RUN=0
VALUE_FLAGS=()
SWITCH_FLAGS=()
ALLOW_PASSTHROUGH=0
# shellcheck disable=SC2034  # read by the scripts that take `-- MORE_FLAGS`
PASSTHROUGH_ARGS=()
# The flags every TPU script takes; GCLOUD_SCOPE (see set_gcloud_scope) follows from them.
# shellcheck disable=SC2034  # read by the TPU scripts
TPU_VALUE_FLAGS=(name:NAME zone:ZONE project:PROJECT)
NAME=""
ZONE=""
PROJECT=""
GCLOUD_SCOPE=()

usage_error() {
  # A wrong command line: says what is wrong and where the help is, exit status 2.
  printf '%s: error: %s\n' "$SCRIPT_NAME" "$*" >&2
  printf "Run '%s --help' for usage.\n" "$SCRIPT_NAME" >&2
  exit 2
}

fail() {
  # Something went wrong while running: exit status 1.
  printf '%s: %s\n' "$SCRIPT_NAME" "$*" >&2
  exit 1
}

quote_word() {
  # Prints $1 so that a POSIX shell reads it back as one word: unchanged when it is made of
  # safe characters, else in single quotes (only the value of a --flag=value is quoted).
  local word="$1" safe='^[A-Za-z0-9_./:=@,+%-]+$' flag_with_value='^(--[A-Za-z0-9_.-]+=)(.+)$'
  if [[ "$word" =~ $safe ]]; then
    printf '%s' "$word"
  elif [[ "$word" =~ $flag_with_value ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
    quote_word "${BASH_REMATCH[2]}"
  else
    printf "'%s'" "${word//\'/\'\\\'\'}"
  fi
}

quote_command() {
  # Prints the words "$@" as one shell command line.
  local line="" word
  for word in "$@"; do
    line+="${line:+ }$(quote_word "$word")"
  done
  printf '%s' "$line"
}

show_command() {
  printf '+ %s\n' "$(quote_command "$@")"
}

run() {
  # Runs "$@" after echoing it to stderr; under --dry-run prints it to stdout and runs nothing.
  if ((DRY_RUN)); then
    show_command "$@"
    return 0
  fi
  show_command "$@" >&2
  "$@"
}

spec_variable() {
  # Prints the VAR of flag $1 among the "flag-name:VAR" specs $2...; fails if $1 is not there.
  local name="$1" spec
  shift
  for spec in "$@"; do
    if [[ "${spec%%:*}" == "$name" ]]; then
      printf '%s' "${spec#*:}"
      return 0
    fi
  done
  return 1
}

value_flag_variable() {
  # Prints the VAR of the value flag $1 (with its --); fails if it is not one.
  spec_variable "${1#--}" ${VALUE_FLAGS[@]+"${VALUE_FLAGS[@]}"}
}

parse_flags() {
  # Sets the variables named in VALUE_FLAGS / SWITCH_FLAGS from the command line "$@".
  local arg variable
  while (($# > 0)); do
    arg="$1"
    shift
    case "$arg" in
      -h | --help)
        usage
        exit 0
        ;;
      --dry-run) DRY_RUN=1 ;;
      --)
        if ((!ALLOW_PASSTHROUGH)) && (($# > 0)); then
          usage_error "unexpected arguments after --: $(quote_command "$@")"
        fi
        # shellcheck disable=SC2034  # read by the scripts that take `-- MORE_FLAGS`
        PASSTHROUGH_ARGS=("$@")
        return 0
        ;;
      --*=*)
        if ! variable="$(value_flag_variable "${arg%%=*}")"; then
          usage_error "unknown flag ${arg%%=*} (or it takes no value)"
        fi
        printf -v "$variable" '%s' "${arg#*=}"
        ;;
      --*)
        if variable="$(spec_variable "${arg#--}" ${SWITCH_FLAGS[@]+"${SWITCH_FLAGS[@]}"})"; then
          printf -v "$variable" '%s' 1
        elif variable="$(value_flag_variable "$arg")"; then
          if (($# == 0)) || [[ "$1" == --* ]]; then
            usage_error "flag $arg needs a value"
          fi
          printf -v "$variable" '%s' "$1"
          shift
        else
          usage_error "unknown flag $arg"
        fi
        ;;
      *) usage_error "unexpected argument '$arg' (flags start with --)" ;;
    esac
  done
}

require_flags() {
  # Usage error naming every flag among "$@" (names without --) whose variable is empty.
  local name variable missing=()
  for name in "$@"; do
    variable="$(value_flag_variable "--$name")"
    if [[ -z "${!variable}" ]]; then
      missing+=("--$name")
    fi
  done
  if ((${#missing[@]} == 1)); then
    usage_error "missing required flag ${missing[0]}"
  elif ((${#missing[@]} > 1)); then
    usage_error "missing required flags ${missing[*]}"
  fi
}

set_gcloud_scope() {
  # GCLOUD_SCOPE: the --zone (and --project) words that every gcloud call of a TPU script takes.
  GCLOUD_SCOPE=(--zone "$ZONE")
  if [[ -n "$PROJECT" ]]; then
    GCLOUD_SCOPE+=(--project "$PROJECT")
  fi
}

tpu_ssh_all() {
  # Runs the shell command $1 on every worker of TPU VM $NAME.
  run gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_SCOPE[@]}" --worker=all --command "$1"
}
