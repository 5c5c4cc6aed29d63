# The README's two commands, and the benchmark.
.PHONY: demo test bench bench-performance bench-slurm lint

demo:
	python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/h5bank demo

test:
	python3 -m venv .venv && .venv/bin/pip install -e '.[dev]' && .venv/bin/ruff check . && .venv/bin/python -m pytest

bench:
	.venv/bin/python benchmarks/build_images.py
	.venv/bin/python benchmarks/scan.py

# The alternatives run in their own environments: h5mapper pins numpy<2; Hugging Face datasets
# and LitData bring their own stacks. A missing one is reported as skipped.
bench-performance:
	test -x /tmp/h5m/bin/python || (python3 -m venv /tmp/h5m && /tmp/h5m/bin/pip install h5mapper==0.3.3 torch==2.13.0 imageio)
	test -x /tmp/alt/bin/python || (python3 -m venv /tmp/alt && /tmp/alt/bin/pip install datasets litdata torch==2.13.0 pillow imageio h5py)
	.venv/bin/python benchmarks/performance.py

bench-slurm:
	bash tests/slurm.sh up && eval "$$(bash tests/slurm.sh env)" && .venv/bin/python benchmarks/slurm_build.py

lint:
	.venv/bin/ruff check . && .venv/bin/ruff format --check .
