# The two commands the README promises; both do their own set-up on a fresh machine.
#   make demo   the main job: the 5.1.0 client's double runJob, direct vs through runonce
#   make test   fmt check, clippy -D warnings, every test
# And the load benchmark (minutes; figures into BENCHMARKS.md): make bench
.PHONY: demo test setup build bench

setup:
	@bash scripts/setup.sh

demo: setup
	cargo run --quiet --release -- demo

test: setup
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings
	cargo test --all-targets

build: setup
	cargo build --release

bench: setup
	bash bench/run.sh
