# Two entry points on a fresh machine: `make demo` and `make test`. Both build .venv first,
# installing the CPU build of torch before the project so pip never pulls the CUDA build.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: venv demo test clean

$(BIN)/ciss: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(BIN)/ciss

venv: $(BIN)/ciss

# The tiny model learns from scratch, so both steps use a higher learning rate than the
# ImageNet-initialised recipes in configs/defaults.toml.
demo: venv
	rm -rf runs/demo
	$(BIN)/ciss learn --run runs/demo --classes sky,grass,water,sand,disk,box --epochs 30 --lr 0.05
	$(BIN)/ciss learn --run runs/demo --new-classes triangle,ring --method mib --epochs 15 --lr 0.05
	$(BIN)/ciss eval --run runs/demo

test: venv
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) runs
