# The README's two commands, and the benchmark.
.PHONY: demo test bench bench-slurm lint

demo:
	python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/h5bank demo

test:
	python3 -m venv .venv && .venv/bin/pip install -e '.[dev]' && .venv/bin/ruff check . && .venv/bin/python -m pytest

bench:
	.venv/bin/python benchmarks/build_images.py
	.venv/bin/python benchmarks/scan.py

bench-slurm:
	bash tests/slurm.sh up && eval "$$(bash tests/slurm.sh env)" && .venv/bin/python benchmarks/slurm_build.py

lint:
	.venv/bin/ruff check . && .venv/bin/ruff format --check .
