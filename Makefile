# The README's two commands, and the benchmark.
.PHONY: demo test bench lint

demo:
	python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/h5bank demo

test:
	python3 -m venv .venv && .venv/bin/pip install -e '.[dev]' && .venv/bin/ruff check . && .venv/bin/python -m pytest

bench:
	.venv/bin/python benchmarks/build_images.py
	.venv/bin/python benchmarks/scan.py

lint:
	.venv/bin/ruff check . && .venv/bin/ruff format --check .
