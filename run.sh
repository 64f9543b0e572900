#!/usr/bin/env bash
# The single entry point: sets up the environment on first use, then runs a subcommand.
#   ./run.sh help        lists the subcommands
# Environment:
#   ARCFACE_VENV   where the virtual environment lives (default: .venv beside this script)
#   PYTHON         interpreter used to create it (default: python3)
#   THP_MEM_ALLOC_ENABLE  huge pages for large CPU tensors (default 1 here; 0 to turn off)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${ARCFACE_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
# PyTorch's CPU allocator backs large tensors with 2 MiB transparent huge pages when this is 1: the
# sharded classifier's multi-hundred-MB temporaries then cost a few page faults instead of ~100k each
# (1M classes at rate 0.1: 1.3 s -> 0.7 s per step, see docs/partial_fc.md). No effect on CUDA memory.
export THP_MEM_ALLOC_ENABLE="${THP_MEM_ALLOC_ENABLE:-1}"

usage() {
  cat <<'USAGE'
usage: ./run.sh <command> [args...]

  setup                 create/refresh the virtual environment (done automatically by every command)
  test [pytest args]    lint (ruff) and run the test suite
  demo [--help]         the whole mission end to end on synthetic faces (CPU, ~10 min)
  train CONFIG [k=v..]  check the config, train under torchrun (TORCHRUN_ARGS="--standalone --nproc_per_node 8"
                        for torchrun's own flags; default 1 process), report how it ended in one line
  eval [args]           arcface-eval: verification packs, IJB-B/C, MegaFace -> report
  export [args]         arcface-export: checkpoint -> ONNX with a parity check
  embed [args]          arcface-embed: aligned face images -> embeddings
  pack_rec [args]       the RecordIO toolkit (pack, info, verify, reindex, unpack, bin, synth)
  bench                 run every benchmark in bench/ and write bench/RESULTS.md
  help                  this text
USAGE
}

ensure_env() {
  # Idempotent: re-installs only when the packaging files changed since the last install, or when the
  # environment was last installed for another clone (the stamp records which one).
  local stamp="$VENV/.arcface-installed"
  local want
  want="$(cat "$ROOT/setup.cfg" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1) $ROOT"
  if [[ -x "$VENV/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    return 0
  fi
  if [[ ! -x "$VENV/bin/python" ]]; then
    echo "[run.sh] creating a virtual environment in $VENV" >&2
    "$PYTHON" -m venv "$VENV"
    echo "[run.sh] installing the project and its dependencies (PyTorch among them): about 2 minutes" \
         "the first time; later commands reuse it" >&2
  elif [[ -f "$stamp" && "$(cut -d' ' -f2- "$stamp")" != "$ROOT" ]]; then
    echo "[run.sh] $VENV holds the install of another clone ($(cut -d' ' -f2- "$stamp"));" \
         "re-pointing it at this one ($ROOT). The other clone will re-point it back when it runs;" \
         "set ARCFACE_VENV to a folder of its own to keep both." >&2
  else
    echo "[run.sh] setup.cfg / pyproject.toml changed: updating $VENV" >&2
  fi
  "$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar on -e "$ROOT[dev]" 2>&1 \
    | { grep -v "^WARNING: Location '" || true; } >&2
  echo "$want" > "$stamp"
  echo "[run.sh] environment ready: $VENV" >&2
}

cmd="${1:-help}"
[[ $# -gt 0 ]] && shift

case "$cmd" in
  help|-h|--help) usage ;;
  setup) ensure_env ;;
  test)
    ensure_env
    cd "$ROOT"
    "$VENV/bin/ruff" check .
    "$VENV/bin/python" -m pytest "$@"
    ;;
  demo)
    ensure_env
    exec "$VENV/bin/python" -m arcface.demo "$@"
    ;;
  train)
    ensure_env
    exec "$VENV/bin/python" -m arcface.launch "$@"
    ;;
  eval) ensure_env; exec "$VENV/bin/arcface-eval" "$@" ;;
  export) ensure_env; exec "$VENV/bin/arcface-export" "$@" ;;
  embed) ensure_env; exec "$VENV/bin/arcface-embed" "$@" ;;
  pack_rec) ensure_env; exec "$VENV/bin/pack_rec" "$@" ;;
  bench) ensure_env; cd "$ROOT"; exec "$VENV/bin/python" bench/run_all.py "$@" ;;
  *) echo "unknown command: $cmd" >&2; usage >&2; exit 2 ;;
esac
