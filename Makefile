# make test: install everything (Debian packages, .venv with pinned Python packages) and run the tests.
# make test-labelstudio: warmtune as the ML backend of a real Label Studio (its own virtualenv, about 3 minutes).
# make demo: install, then run the end-to-end demo on Fashion-MNIST.
# make compose-test: the Docker image built and the compose stack run for real (see its target below).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEBIAN_PACKAGES := dataset-fashion-mnist redis-server docker-compose prometheus
REDIS_PORT ?= 6379
# Label Studio's Django stack has no place in warmtune's environment: it gets its own.
LABELSTUDIO_VENV := .venv-labelstudio
LABELSTUDIO_STAMP := $(LABELSTUDIO_VENV)/.installed

.PHONY: install system-deps redis lint format compose-test test test-labelstudio labelstudio-screenshot demo bench bench-stream bench-consolidation bench-history bench-label-check experiment clean

install: system-deps $(STAMP)

# Reinstalled only when the pins change; an unchanged .venv costs nothing.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev,bench]'
	touch $@

system-deps:
	@missing=$$(for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $$missing"; \
		$(SUDO) apt-get install -y -q $$missing >/dev/null 2>&1 || \
		{ $(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q $$missing; }; \
	fi

# Tests use the Redis on 127.0.0.1:$(REDIS_PORT); start one if none answers.
redis:
	@redis-cli -p $(REDIS_PORT) ping >/dev/null 2>&1 || \
		redis-server --daemonize yes --bind 127.0.0.1 --port $(REDIS_PORT) --save "" --appendonly no

test: install redis lint
	$(BIN)/pytest -q

# ruff's linter and formatter (config in pyproject.toml); `make format` applies the formatting.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

$(LABELSTUDIO_STAMP): integration/labelstudio-constraints.txt
	$(PYTHON) -m venv $(LABELSTUDIO_VENV)
	$(LABELSTUDIO_VENV)/bin/pip install -q --disable-pip-version-check -c $< label-studio==1.23.2
	touch $@

test-labelstudio: install redis $(LABELSTUDIO_STAMP)
	WARMTUNE_TEST_LABELSTUDIO=$(LABELSTUDIO_VENV)/bin/label-studio $(BIN)/pytest -q integration

# The README's screenshot of a task pre-annotated by warmtune (Debian's Chromium, playwright in Label Studio's venv).
labelstudio-screenshot: install redis $(LABELSTUDIO_STAMP)
	@dpkg -s chromium >/dev/null 2>&1 || $(SUDO) apt-get install -y -q chromium
	$(LABELSTUDIO_VENV)/bin/pip install -q --disable-pip-version-check playwright==1.65.2
	WARMTUNE_SCREENSHOT=$(CURDIR)/docs/label-studio-task.png WARMTUNE_TEST_LABELSTUDIO=$(LABELSTUDIO_VENV)/bin/label-studio \
		$(BIN)/pytest -q integration

demo: install
	$(BIN)/warmtune demo

# The Docker image built and the compose stack run for real, on images made here from Debian's
# archive (needs root for debootstrap; starts no dockerd: start one first). Minutes; not in make test.
compose-test: install
	@for p in docker.io debootstrap; do dpkg -s $$p >/dev/null 2>&1 || $(SUDO) apt-get install -y -q $$p; done
	$(BIN)/python deploy/compose-test/run.py

bench: install
	@dpkg -s wrk >/dev/null 2>&1 || $(SUDO) apt-get install -y -q wrk
	$(BIN)/warmtune bench update-step --arch resnet18 --image-size 32
	$(BIN)/warmtune bench predict --image-size 32 --threads 1
	$(BIN)/warmtune bench predict --image-size 64 --threads 1

# The learning loop over HTTP, clean and poisoned streams plus the joint-training bound (about 15 + 25 minutes on 2 cores).
bench-stream: install
	$(BIN)/warmtune bench stream --arch resnet18 --image-size 32
	$(BIN)/warmtune bench stream --arch alexnet --image-size 64

# Consolidation on (the default) and off: AlexNet at 64 px, clean stream, 3 repetitions each (about 55 minutes).
bench-consolidation: install
	for rep in 1 2 3; do \
		$(BIN)/warmtune bench stream --arch alexnet --image-size 64 --runs clean --no-joint --out bench/results/consolidation/on-$$rep; \
		$(BIN)/warmtune bench stream --arch alexnet --image-size 64 --runs clean --no-joint --set consolidate_growth=0 \
			--out bench/results/consolidation/off-$$rep; \
	done

# GET /updates/{id} and /metrics against 10 to 1000 versions and 100 to 10,000 sets (about 2 minutes),
# then a step's cost at 10, 100 and 1000 applied sets (about 8 minutes).
bench-history: install
	$(BIN)/warmtune bench history
	$(BIN)/warmtune bench history --at 10,100,1000 --set consolidate_growth=0

# The gate's label-check rules on crafted clean, relabelled and half-wrong sets (about 8 minutes).
bench-label-check: install
	$(BIN)/warmtune bench label-check

experiment: install
	$(BIN)/warmtune experiment --study all --quick --out var/experiment-quick

clean:
	rm -rf $(VENV) $(LABELSTUDIO_VENV) var .pytest_cache
