# The two commands: `make run` and `make test`. Everything else is set up on the way.
SHELL := /bin/bash
UV := $(shell command -v uv 2>/dev/null || echo .tools/bin/uv)

.PHONY: setup run test lint bench down clean

$(UV):
	python3 -m venv .tools && .tools/bin/pip install -q uv

setup: $(UV)
	$(UV) sync --all-packages --frozen

run: setup
	$(UV) run omni dev up

down: setup
	$(UV) run omni dev down

test: setup
	$(UV) run pytest

lint: setup
	$(UV) run ruff check . && $(UV) run ruff format --check .

bench: setup
	$(UV) run omni bench all

clean:
	rm -rf .venv .tools .omni .pytest_cache .ruff_cache
