# Two entry points on a fresh machine: `make demo` and `make test`. Both build .venv first,
# installing the CPU build of torch before the project so pip never pulls the CUDA build, then the
# project with the training extra (torch, onnx), the ROS extra and the test tools.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: venv demo test clean

$(BIN)/ciss: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[train,dev,ros]'
	touch $(BIN)/ciss

venv: $(BIN)/ciss

# Learn, go live, learn more while live, hot-swap: `ciss demo` (ciss/apps/demo.py). --force
# replaces the previous demo's files in demo-out/, so the target can be run again.
demo: venv
	$(BIN)/ciss demo --out demo-out --force

test: venv
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) runs models out demo-out demo-camvid
