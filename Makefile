# The two commands: `make run` and `make test`. Everything else is set up on the way.
# Works in CI (CI=true, no stdin): nothing here prompts.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

# uv from PATH when there is one, else a private copy bootstrapped into .tools/.
UV := $(shell command -v uv 2>/dev/null || echo .tools/bin/uv)
# After `setup` the environment is in sync: don't let `uv run` re-resolve or touch uv.lock.
RUN := $(UV) run --no-sync
PYTEST_ARGS ?=
# `make test` runs the whole suite on the broker the fixtures choose (Apache Kafka when Java
# 17+ is here), then the tests marked `tansu` again on Tansu, so the zero-install path stays
# proven. TANSU_SUBSET= (empty) skips that second run.
TANSU_SUBSET ?= -m tansu

# The TypeScript contract package (@omni/contracts), checked by `make test` when Node is here.
TS_PACKAGE := libs/contracts/typescript

.PHONY: setup run test lint bench down clean contracts browser demo node-deps

setup:
	@if [ ! -x "$(UV)" ]; then \
		echo "bootstrapping uv into .tools/"; \
		python3 -m venv .tools && .tools/bin/pip install -q uv; \
	fi
	@if [ -f uv.lock ]; then \
		$(UV) sync --all-packages --frozen; \
	else \
		$(UV) sync --all-packages; \
	fi

run: setup
	$(RUN) omni dev up

# Debian's chromium for the console's browser test (as root; never a downloaded browser).
browser:
	@if command -v chromium >/dev/null 2>&1; then chromium --version; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; \
	else echo "install Debian's chromium (apt-get install chromium) for the browser test"; fi

# The stories against the running stack (`make run` in another terminal).
demo: setup
	$(RUN) omni demo

# The TypeScript package's dependencies, installed from its lock file once, and again only
# when the lock changes (npm writes node_modules/.package-lock.json at each install).
node-deps:
	@if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then \
		echo "node/npm: none (the TypeScript contract tests will be skipped)"; \
	elif [ ! -f $(TS_PACKAGE)/node_modules/.package-lock.json ] \
		|| [ $(TS_PACKAGE)/package-lock.json -nt $(TS_PACKAGE)/node_modules/.package-lock.json ]; then \
		(cd $(TS_PACKAGE) && npm ci --prefer-offline --no-audit --no-fund) \
		|| echo "npm ci failed: the TypeScript contract tests will say so" >&2; \
	fi

test: setup node-deps
	@command -v chromium >/dev/null 2>&1 || $(MAKE) --no-print-directory browser || true
	$(RUN) pytest $(PYTEST_ARGS)
	@if [ -n "$(TANSU_SUBSET)" ]; then \
		echo "== the tansu subset on Tansu"; \
		code=0; OMNI_BROKER=tansu $(RUN) pytest $(TANSU_SUBSET) $(PYTEST_ARGS) || code=$$?; \
		if [ "$$code" = 5 ]; then echo "(no tansu-marked test among these)"; code=0; fi; \
		exit $$code; \
	fi

lint: setup
	$(RUN) ruff check .
	$(RUN) ruff format --check .

bench: setup
	$(RUN) omni bench all

# A stack started with `omni dev up --detach` (or left by a killed terminal).
down:
	@if [ -x .venv/bin/omni ]; then .venv/bin/omni dev down; else echo "nothing to stop"; fi

# Stops the dev stack first: its PostgreSQL must not outlive its data directory.
clean: down
	rm -rf .omni .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -not -path './.venv/*' -not -path './.tools/*' -prune -exec rm -rf {} +

# Regenerate the committed contract after changing an event model: docs/asyncapi.yaml,
# docs/schemas/ and, from those schemas, the TypeScript types (needs Node).
contracts: setup node-deps
	$(RUN) omni docs asyncapi --output docs/asyncapi.yaml
	$(RUN) python -m omni_contracts.schemas --output docs/schemas
	@if command -v node >/dev/null 2>&1; then cd $(TS_PACKAGE) && node scripts/generate.mjs; \
	else echo "node: none, so $(TS_PACKAGE)/src/generated/ is NOT regenerated" >&2; fi
	$(RUN) omni contracts check --against HEAD
