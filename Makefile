# hns: two set-up commands on a fresh Debian machine with root: `make run`, `make test`.
# Each target installs what it needs (apt packages, the virtualenv, the package).

PYTHON ?= python3
VENV   ?= .venv
NETWORKING_MODE ?=       # make run NETWORKING_MODE=mirrored: WSL's networkingMode (default:
                         # the settings file's, else nat)
BIN    := $(VENV)/bin
STAMPS := .stamps
# commands the project and its tests run, and the Debian packages that bring them
TOOLS    := nft ip nsenter socat iperf3 dig ping curl dnsmasq tcpdump etcd etcdctl pasta
APT_PKGS := nftables iproute2 util-linux socat iperf3 dnsutils iputils-ping curl procps dnsmasq-base tcpdump \
            etcd-server etcd-client passt \
            python3-venv

.PHONY: run test unit integration bench lint down clean deps

run: deps
	$(BIN)/hnsctl up $(if $(strip $(NETWORKING_MODE)),--networking-mode $(strip $(NETWORKING_MODE)))

down: deps
	$(BIN)/hnsctl down

test: deps
	$(BIN)/pytest tests -n 2 -p no:cacheprovider

unit: deps
	$(BIN)/pytest tests/unit -p no:cacheprovider

integration: deps
	$(BIN)/pytest tests/integration -n 2 -p no:cacheprovider

bench: deps
	$(BIN)/python bench/bench_vm.py
	$(BIN)/python bench/bench_portmap.py
	$(BIN)/python bench/bench_relay.py
	$(BIN)/python bench/bench_forward.py
	$(BIN)/python bench/bench_mirrored.py
	$(BIN)/python bench/bench_service.py
	$(BIN)/python bench/bench_metrics.py
	$(BIN)/python bench/bench_diag.py
	$(BIN)/python bench/bench_overlay.py
	$(BIN)/python bench/bench_datapath.py

lint: deps
	$(BIN)/ruff check hns nat portproxy tests bench examples
	$(BIN)/mypy hns nat portproxy bench tests/unit tests/helpers
	$(BIN)/lint-imports --no-cache

deps: $(STAMPS)/apt $(STAMPS)/venv

$(STAMPS)/apt: Makefile
	@mkdir -p $(STAMPS)
	@missing=""; for t in $(TOOLS); do command -v $$t >/dev/null 2>&1 || missing="$$missing $$t"; done; \
	$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || missing="$$missing venv"; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages for:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PKGS); \
	fi
	@touch $@

$(STAMPS)/venv: setup.cfg pyproject.toml
	@mkdir -p $(STAMPS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,dev]'
	@touch $@

clean:
	rm -rf $(STAMPS) $(VENV) *.egg-info
