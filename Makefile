# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv and install the package with its dev extras once;
# the stamp file makes later calls skip the install.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python train.py

# one pytest-xdist worker per core, a test file at a time (its module fixtures made once); files in their own
# order, as xdist's default (most tests first) starts test_export and test_train together and one waits on
# the digits fit the other trains for both (tests/conftest.py)
test: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --dist loadfile --no-loadscope-reorder tests

bench: $(STAMP)
	$(BIN)/python -m tome_train.bench --model vit_small_patch16_224 vit_base_patch16_224 --r 13 16 --pair --device cpu --batch-size 32 --output bench.json

clean:
	rm -rf $(VENV) runs wandb
