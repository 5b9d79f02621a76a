# Two commands a newcomer needs: `make demo` and `make test`. Both make their own
# virtual environment and install everything into it.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The extras the venv is built with depend on the machine: the libvirt driver builds only
# where libvirt's headers are (CI installs them). The stamp's name records that, so a venv
# made before the headers arrived is brought up to date instead of silently lacking libvirt.
comma  := ,
LIBVIRT := $(shell pkg-config --exists libvirt 2>/dev/null && echo 1)
EXTRAS := test$(if $(LIBVIRT),$(comma)libvirt)
STAMP  := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: demo test bench lint clean secrets nats-conf sim sim-long

$(STAMP): pyproject.toml
	[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[$(EXTRAS)]'
	rm -f $(VENV)/.installed $(VENV)/.installed-*
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m hafence.lab.demo

# The deterministic simulation (docs/simulation.md): seeds of 10 simulated minutes each, in parallel.
SIM_JOBS ?= $(shell nproc 2>/dev/null || echo 2)
# Three seeds in four fence by power cycle with auto_clear (--reboot-share): fenced hosts
# come back and take VMs, so L1 checks restarts in most seeds instead of excusing them
# for want of room (docs/simulation.md, "L1's room").
SIM := $(BIN)/python -m hafence.sim --jobs $(SIM_JOBS) --log-dir sim-failures --reboot-share 0.75

test: $(STAMP)
	$(BIN)/ruff check shared services tests bench
	$(BIN)/python -m pytest -q
	$(SIM) --seeds 300

sim: $(STAMP)
	$(SIM) --seeds 300

sim-long: $(STAMP)
	$(SIM) --seeds 10000 --keep-going

bench: $(STAMP)
	$(BIN)/python -m bench

secrets: $(STAMP)
	$(BIN)/hafence deploy secrets --config deploy/cluster.toml

nats-conf: $(STAMP)
	$(BIN)/hafence deploy nats-conf --config deploy/cluster.toml --out deploy/nats.conf

lint: $(STAMP)
	$(BIN)/ruff check shared services tests bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
