#!/usr/bin/env bash
# Refresh requirements/lock.txt: the exact version of every package the test environment installs,
# resolved by uv from pyproject.toml's ranges (test extra included) for CPython 3.11 on x86_64 Linux,
# the development and CI machine. torch is resolved as its CPU build and left out of the lock:
# scripts/setup.sh installs it (torch==2.13.0 on a CPU machine, the system's torch on a GPU machine).
# Run: make lock   (then `make test`, and commit the new lock with what it needed)
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS=${GPUTWIN_TOOLS_VENV:-.venv-tools}
if [ ! -x "$TOOLS/bin/uv" ]; then
  python3 -m venv "$TOOLS"
  "$TOOLS/bin/python" -m pip install --disable-pip-version-check -q "uv>=0.9"
fi
find_links=()
for dir in ${PIP_FIND_LINKS:-} /opt/wheels; do
  [ -d "$dir" ] && find_links+=(--find-links "$dir")
done
"$TOOLS/bin/uv" pip compile pyproject.toml --extra test --upgrade \
  --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
  "${find_links[@]}" --override requirements/torch-cpu.txt --no-emit-package torch \
  --custom-compile-command "make lock" --quiet -o requirements/lock.txt
echo "lock: requirements/lock.txt ($(grep -c '==' requirements/lock.txt) packages)"
