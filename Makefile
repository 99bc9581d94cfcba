# Two entry points for a newcomer: `make demo` and `make test`. Each installs what it needs
# into .venv first (torch pinned to its CPU build first; see STACK notes in README).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0
DEEPSPEED_VERSION ?= 0.19.8
# Debian packages of the real services the tests start (S3: Ceph radosgw; PostgreSQL; Chromium;
# iproute2 for the network namespaces of the multi-node test with distinct addresses).
SYSTEM_PACKAGES := ceph-mon ceph-osd radosgw postgresql chromium iproute2

.PHONY: install system-packages demo test test-quick lint

$(STAMP): pyproject.toml Makefile
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip wheel setuptools
	# torch first and pinned: anything unpinned pulls a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==$(TORCH_VERSION)
	# deepspeed builds against the torch above, so no build isolation.
	$(BIN)/pip install --quiet --no-build-isolation deepspeed==$(DEEPSPEED_VERSION)
	$(BIN)/pip install --quiet -e '.[dev]'
	# tinker-cookbook without its deps (listed in the dev extra): its tml-renderers>=0.4.1 is
	# not on the package index here.
	$(BIN)/pip install --quiet --no-deps tinker-cookbook==0.6.1
	# DeepSpeed's ops, built once here (never inside a run: workers/runtime/deepspeed_ops.py).
	$(BIN)/python -m workers.runtime.deepspeed_ops
	touch $@

install: $(STAMP)

# As root with apt, installs the services the tests use; elsewhere those tests skip and
# say what to install (with CI=true they fail instead).
system-packages:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
		if [ -n "$$missing" ]; then \
			apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
		fi; \
	else echo "not root or no apt-get: tests needing $(SYSTEM_PACKAGES) will skip"; fi

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/lorafleet demo

# Stages: the main suite; then the long comparisons and the fault tests (kills, outages);
# then a multi-node Ray cluster on this machine (a pytest process of its own: the others
# share one local Ray); then the dashboard in Debian's chromium.
test: $(STAMP) system-packages
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m "not faults and not long and not browser and not multinode"
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m "(faults or long) and not browser and not multinode"
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m multinode
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m browser

test-quick: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check core orchestrator workers api tests bench
	$(BIN)/ruff format --check core orchestrator workers api tests bench
	$(BIN)/lint-imports  # contracts in pyproject.toml: api replica and core load no torch/Ray
	$(BIN)/mypy
