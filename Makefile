# The README's two commands, the benchmarks, the lock and the docs.
.PHONY: demo test test-latest lock docs bench bench-performance bench-slurm lint fuzz

demo:
	python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/h5bank demo

test:
	python3 -m venv .venv && .venv/bin/pip install -c constraints.txt -e '.[dev]' && .venv/bin/ruff check . && .venv/bin/python -m pytest

# The tests against the newest packages the index serves, in an environment of their own: what a
# new release of a dependency breaks, seen before it reaches the lock.
test-latest:
	rm -rf .venv-latest && python3 -m venv .venv-latest && .venv-latest/bin/pip install -e '.[dev]' && .venv-latest/bin/python -m pytest

# Refresh constraints.txt on purpose: the newest packages, kept only if every test passes with them.
lock:
	rm -rf .venv-lock && python3 -m venv .venv-lock && .venv-lock/bin/pip install -e '.[dev]'
	.venv-lock/bin/python -m pytest -q
	{ echo "# pip install -c constraints.txt -e '.[dev]': the versions the tests last passed with."; \
	  echo "# Made by 'make lock' on $$(date -u +%Y-%m-%d), Python $$(.venv-lock/bin/python -c 'import platform; print(platform.python_version())')."; \
	  .venv-lock/bin/pip freeze --exclude-editable | sed -e 's/^\(torch==[^+]*\)+.*/\1/'; } > constraints.txt

# The documentation site, served while you edit it.
docs:
	.venv/bin/mkdocs serve

bench:
	.venv/bin/python benchmarks/build_images.py
	.venv/bin/python benchmarks/scan.py

# The alternatives run in their own environments: h5mapper pins numpy<2; Hugging Face datasets
# and LitData bring their own stacks. A missing one is reported as skipped.
bench-performance:
	test -x /tmp/h5m/bin/python || (python3 -m venv /tmp/h5m && /tmp/h5m/bin/pip install h5mapper==0.3.3 torch==2.13.0 imageio)
	test -x /tmp/alt/bin/python || (python3 -m venv /tmp/alt && /tmp/alt/bin/pip install datasets litdata torch==2.13.0 pillow imageio h5py)
	.venv/bin/python benchmarks/performance.py
	.venv/bin/python benchmarks/sounds.py
	.venv/bin/python benchmarks/remote.py

bench-slurm:
	bash tests/slurm.sh up && eval "$$(bash tests/slurm.sh env)" && .venv/bin/python benchmarks/slurm_build.py

# The fuzzer of docs/security.md, longer than its CI run (300 copies, seed 0).
fuzz:
	H5BANK_FUZZ=$${H5BANK_FUZZ:-5000} H5BANK_FUZZ_SEED=$${H5BANK_FUZZ_SEED:-1} .venv/bin/python -m pytest -q -s tests/test_fuzz.py

lint:
	.venv/bin/ruff check . && .venv/bin/ruff format --check .
