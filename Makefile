# The two commands of the README's quick start. Each sets up .venv on first use.
.PHONY: demo test setup

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/gputwin demo

test: setup
	.venv/bin/python -m pytest -n 2 -q
