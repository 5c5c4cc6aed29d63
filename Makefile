# The README's two commands, and the benchmark.
.PHONY: demo test bench bench-serve bench-slurm lint

demo:
	python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/h5bank demo

test:
	python3 -m venv .venv && .venv/bin/pip install -e '.[dev]' && .venv/bin/ruff check . && .venv/bin/python -m pytest

bench:
	.venv/bin/python benchmarks/build_images.py
	.venv/bin/python benchmarks/scan.py

# h5mapper runs in its own environment (it pins numpy<2); without it that figure is skipped.
bench-serve:
	test -x /tmp/h5m/bin/python || (python3 -m venv /tmp/h5m && /tmp/h5m/bin/pip install h5mapper==0.3.3 torch==2.13.0 imageio)
	.venv/bin/python benchmarks/serve.py

bench-slurm:
	bash tests/slurm.sh up && eval "$$(bash tests/slurm.sh env)" && .venv/bin/python benchmarks/slurm_build.py

lint:
	.venv/bin/ruff check . && .venv/bin/ruff format --check .
