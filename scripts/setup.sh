#!/usr/bin/env bash
# Create .venv and install gputwin into it, once; later calls return at once (until pyproject.toml or
# the lock changes). The packages come at the exact versions of requirements/lock.txt (`make lock`
# refreshes it); GPUTWIN_LOCK=none takes the newest releases pyproject.toml allows (`make test-latest`).
# Without an NVIDIA GPU it takes the CPU build of torch (torch==2.13.0 lies on disk on this kind of
# machine) instead of a multi-GB CUDA build; with a GPU it keeps the torch the system already has.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${GPUTWIN_VENV:-.venv}
PY=${PYTHON:-python3}
LOCK=${GPUTWIN_LOCK:-requirements/lock.txt}
stamp="$VENV/.gputwin-installed"

if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && { [ "$LOCK" = none ] || [ "$stamp" -nt "$LOCK" ]; }; then
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  if "$PY" -c "import torch" 2>/dev/null; then
    echo "setup: reusing the system's torch ($("$PY" -c 'import torch; print(torch.__version__)'))"
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi
pip=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found; installing torch"
    "${pip[@]}" torch
  else
    echo "setup: no NVIDIA GPU; installing the CPU build of torch"
    "${pip[@]}" "torch==2.13.0" || {
      echo "setup: torch==2.13.0 is not available here; install a CPU build of torch into $VENV yourself" >&2
      exit 1
    }
  fi
fi

if [ "$LOCK" = none ]; then
  echo "setup: no lock; the newest releases pyproject.toml allows"
  "${pip[@]}" -e ".[test]"
else
  # the lock leaves torch out: the one installed above (or the system's) stays
  "${pip[@]}" -r "$LOCK"
  "${pip[@]}" --no-deps -e .
fi
touch "$stamp"
echo "setup: ready ($VENV)"
