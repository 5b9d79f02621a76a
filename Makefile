# Two commands a newcomer needs: `make demo` and `make test`. Both make their own
# virtual environment and install everything into it.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test bench lint clean secrets nats-conf

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	# The libvirt driver builds only where libvirt's headers are (CI installs them).
	if pkg-config --exists libvirt 2>/dev/null; then $(BIN)/pip install --quiet -e '.[libvirt]'; fi
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m hafence.lab.demo

test: $(STAMP)
	$(BIN)/ruff check shared services tests bench
	$(BIN)/python -m pytest -q

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
