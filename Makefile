# qrec: `make demo` runs the main job, `make test` runs every check. Each sets itself up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
KAFKA  := deploy/kafka/kafka.sh

.PHONY: help venv demo demo-processes up test lint typecheck unit bench kafka-jars prometheus clean

help:
	@echo "make demo   - run the main job on the embedded bus (sets up .venv first)"
	@echo "make demo-processes - the same demo on a local Kafka broker, each service its own OS process"
	@echo "make up     - run a whole deployment here (Kafka, services, simulated shoppers, Prometheus)"
	@echo "make test   - lint, type-check and run all tests against a real Kafka broker and Prometheus"
	@echo "make bench  - run all benchmarks, writing out/bench.json"

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

# A real Prometheus server for the metrics tests (Debian package), installed only when missing.
prometheus:
	@if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then \
	  echo "installing Debian package prometheus"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq prometheus >/dev/null; \
	  $$SUDO systemctl stop prometheus prometheus-node-exporter >/dev/null 2>&1 || true; \
	fi

kafka-jars:
	$(KAFKA) fetch

demo: $(STAMP)
	$(BIN)/qrec demo

# The demo as deployed: a Kafka broker from deploy/kafka, the state-builder, the actor and the three
# learners each as its own OS process; the shop's clock runs 20x the wall clock (1.5 hours in 4.5 minutes).
demo-processes: $(STAMP) kafka-jars
	$(BIN)/qrec demo --processes --bootstrap-servers local --hours 1.5

# A local deployment: Kafka, 2 state-builders, the learner, 2 actors, simulated shoppers at 10x real
# time and Prometheus on :9090; logs and deployment.json in qrec-run/. Ctrl-C stops it in order.
UP_ARGS ?= --simulate --simulate-speed 10 --metrics-port 9100
up: $(STAMP) kafka-jars
	$(BIN)/qrec up $(UP_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check services rl schemas tests
	$(BIN)/ruff format --check services rl schemas tests

typecheck: $(STAMP)
	$(BIN)/mypy services schemas

test: $(STAMP) prometheus kafka-jars lint typecheck
	$(BIN)/python -m pytest

bench: $(STAMP) kafka-jars
	@mkdir -p out
	$(BIN)/qrec bench --json out/bench.json

clean:
	rm -rf $(VENV) out .pytest_cache .mypy_cache .ruff_cache
