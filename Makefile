# The two commands of the README's quick start. Each sets up .venv on first use.
.PHONY: demo test setup lock test-latest

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/gputwin demo

test: setup
	.venv/bin/python -m pytest -n 2 -q

# Refresh requirements/lock.txt from pyproject.toml's ranges (uv pip compile).
lock:
	@bash scripts/lock.sh

# The suite against the newest releases pyproject.toml allows, in a fresh .venv-latest (not the lock).
test-latest:
	rm -rf .venv-latest
	GPUTWIN_VENV=.venv-latest GPUTWIN_LOCK=none bash scripts/setup.sh
	.venv-latest/bin/pip list --format=freeze 2>/dev/null | grep -iE '^(torch|transformers|peft|textual|numpy|kernels)=' || true
	.venv-latest/bin/python -m pytest -n 2 -q
