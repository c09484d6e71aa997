# The README's two set-up commands are `make setup` and `make test`; `.ci/run` runs exactly these.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup setup-ops test demo lint format

setup: setup-ops
	$(PYTHON) -m venv $(VENV)
	# The CPU wheel of torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[worker,dev]'

# Prometheus and promtool from Debian's `prometheus` package, for the observability tests.
# Where apt-get is missing it is skipped with a note, and those tests skip. The package's
# service is not wanted running: stopped and disabled where systemd runs.
setup-ops:
	@if command -v prometheus >/dev/null && command -v promtool >/dev/null; then \
		echo "prometheus and promtool are installed"; \
	elif command -v apt-get >/dev/null; then \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -qq && \
		$$SUDO env DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq --no-install-recommends prometheus >/dev/null && \
		if [ -d /run/systemd/system ]; then $$SUDO systemctl disable --now prometheus; fi; \
	else \
		echo "apt-get not found: Prometheus not installed, the observability tests will skip"; \
	fi

test: lint
	$(BIN)/pytest

demo:
	$(BIN)/lorafleet demo

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format:
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .
