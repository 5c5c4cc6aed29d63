"""``python -m pipeline.cli``: the ``h5bank`` command."""

from pipeline.cli import main

if __name__ == "__main__":
    main()
