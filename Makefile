# confer: `make demo` runs a local federation, `make test` runs every check.
# Both install what they need first (deploy/bootstrap.sh, idempotent).

SHELL := /bin/bash
.DEFAULT_GOAL := help

# Build outside the clone so later runs on the same machine reuse it.
CARGO_TARGET_DIR ?= $(HOME)/.cache/confer/target
export CARGO_TARGET_DIR

# tch finds libtorch through the venv's torch (see docs/development.md).
VENV := $(CURDIR)/.venv
export VIRTUAL_ENV := $(VENV)
export PATH := $(VENV)/bin:$(PATH)
export LIBTORCH_USE_PYTORCH := 1

CONFER := $(CARGO_TARGET_DIR)/debug/confer

.PHONY: help bootstrap build demo demo-serve test fmt lint test-rust test-python test-notebooks fuzz

help:
	@echo "make demo        start a local federation over GiBleed, run DP queries, stop"
	@echo "make demo-serve  the same, then keep it running for your own queries"
	@echo "make test        formatting, clippy, Rust tests, Python tests (python/tests, tests/python), notebooks"
	@echo "make fuzz        every fuzz target for FUZZ_SECS seconds (60), with a table of executions and findings"

bootstrap:
	@deploy/bootstrap.sh

build: bootstrap
	cargo build --bin confer

demo: build
	$(CONFER) demo

demo-serve: build
	$(CONFER) demo --serve

fmt: bootstrap
	cargo fmt --all

lint: bootstrap
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings
	cargo clippy -p confer-models -p confer-coordinator --no-default-features --all-targets -- -D warnings
	@# The coordinator (a commission's server) builds without libtorch.
	@if cargo tree -p confer-coordinator -e normal,build | grep -q 'torch-sys'; then \
		echo "confer-coordinator depends on libtorch (torch-sys): keep tch behind confer-models' torch feature"; exit 1; \
	fi

test-rust: bootstrap
	cargo test --workspace

# The confer package's tests (python/tests) and the Flight SQL client tests
# (tests/python), against real federations started from $(CONFER).
test-python: bootstrap
	CONFER_BIN=$(CONFER) $(VENV)/bin/python -m pytest -q python/tests tests/python

# Every notebook (notebooks/*.ipynb) run top to bottom with nbmake against
# local federations, and each .ipynb checked against its jupytext .py
# (notebooks/test_pairs.py).
test-notebooks: bootstrap
	CONFER_BIN=$(CONFER) $(VENV)/bin/python -m pytest -q --nbmake --nbmake-timeout=300 notebooks/

test: lint build test-rust test-python test-notebooks

# Fuzzing (not part of `make test`): needs the nightly toolchain and cargo-fuzz.
FUZZ_SECS ?= 60
fuzz:
	@command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
	fuzz/run.sh $(FUZZ_SECS)
