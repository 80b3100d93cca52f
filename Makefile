# One place for what people and CI run. `make test` is the whole test suite on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export CARGO_TERM_COLOR ?= never

.PHONY: all venv build interop run test test-rust test-python test-slow soak lint fmt bench bench-rust demo fuzz clean

all: test

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "maturin>=1.7,<2"
	touch $@

venv: $(VENV)/.installed

# Builds the extension (release) into the venv with the dev extras.
build: venv
	$(VENV)/bin/maturin develop --release --extras dev --quiet

test-rust:
	cargo test --workspace

# The Rust peer of the interop tests (tests/interop: the crates.io Rust implementation).
interop:
	cargo build --quiet --manifest-path tests/interop/Cargo.toml

test-python: build interop
	$(PY) -m pytest

# The whole suite: Rust tests, then the extension build and pytest.
test: test-rust test-python

lint: build
	$(VENV)/bin/ruff check python tests benches
	$(VENV)/bin/ruff format --check python tests benches
	$(VENV)/bin/mypy
	$(PY) -m mypy.stubtest cmd_ipc._core
	cargo fmt --all --check
	cargo fmt --manifest-path tests/interop/Cargo.toml --check
	cargo clippy --workspace --all-targets -- -D warnings
	cargo clippy --manifest-path tests/interop/Cargo.toml -- -D warnings

fmt: venv
	$(VENV)/bin/ruff format python tests benches
	$(VENV)/bin/ruff check --fix python tests benches
	cargo fmt --all
	cargo fmt --manifest-path tests/interop/Cargo.toml

# The main job: the latency benchmark (cmd-ipc bench, pinned, under a minute).
run: build
	$(VENV)/bin/cmd-ipc bench --pin

# A small printed demo of a three-level in-process tree.
demo: build
	$(PY) -m cmd_ipc demo

bench: build
	$(PY) -m pytest benches --benchmark-only -p no:cacheprovider
	cargo bench -p cmd-ipc-core

bench-rust:
	cargo bench -p cmd-ipc-core

# Slow soak/property runs (more hypothesis examples), never in the default test run.
test-slow: build
	$(PY) -m pytest -m slow

# The chaos soak (tests/test_soak.py): kills, stalls, floods against a tree of real workers
# while callers call; SOAK_SECONDS long (default 300), well under 10 minutes in all.
soak: build
	$(PY) -m pytest -m soak -s -p no:cacheprovider -o timeout=900 tests/test_soak.py

# Coverage-guided fuzzing with libFuzzer, FUZZ_SECONDS per target (default 60). Uses the
# machine's stable toolchain (RUSTC_BOOTSTRAP for cargo-fuzz's flags) without a sanitizer.
# New corpus entries land in rust/<crate>/fuzz/corpus/<target>/ and are replayed by `cargo test`
# (rust/<crate>/tests/fuzz_corpus.rs); crashes land in rust/<crate>/fuzz/artifacts/.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := json_decode msgpack_decode frame_decode router_ops
# The shm rings against a peer that writes anything into the shared memory.
FUZZ_NATIVE_TARGETS := ring_state
fuzz:
	command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
	cd rust/core/fuzz && for t in $(FUZZ_TARGETS); do \
	  RUSTC_BOOTSTRAP=1 cargo fuzz run -s none --release $$t -- \
	    -max_total_time=$(FUZZ_SECONDS) -max_len=4096 -rss_limit_mb=512 || exit 1; \
	done
	cd rust/native/fuzz && for t in $(FUZZ_NATIVE_TARGETS); do \
	  RUSTC_BOOTSTRAP=1 cargo fuzz run -s none --release $$t -- \
	    -max_total_time=$(FUZZ_SECONDS) -max_len=4096 -rss_limit_mb=512 || exit 1; \
	done

clean:
	rm -rf $(VENV) target .pytest_cache .mypy_cache .ruff_cache
