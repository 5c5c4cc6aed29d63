"""imageio's Pillow plugin imports ``pillow_heif`` for every image it opens; h5bank makes that
import fail fast when the package is absent, and leaves it alone when it is installed."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def run(code: str, path: str | None = None) -> str:
    env_path = [path] if path else []
    script = f"import sys; sys.path[:0] = {env_path!r}\n" + code
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


DECODE = textwrap.dedent("""
    import io, importlib.abc
    import numpy as np
    from PIL import Image as PILImage
    from features import Image

    searches = []
    class Watch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.startswith("pillow_heif"):
                searches.append(name)
            return None
    sys.meta_path.insert(0, Watch())
    buffer = io.BytesIO()
    # A BMP: JPEGs and PNGs are read by Pillow alone, other formats through imageio's plugin.
    PILImage.fromarray(np.full((4, 5, 3), 7, np.uint8)).save(buffer, format="BMP")
    feature = Image(mode="RGB")
    for _ in range(50):
        assert feature.decode(buffer.getvalue(), "x.bmp").shape == (4, 5, 3)
""")


def test_an_absent_pillow_heif_is_looked_for_once_not_per_image():
    out = run(DECODE + "\nprint(len(searches), sys.modules['pillow_heif'])")
    searches, module = out.split()
    assert int(searches) <= 1 and module == "None"


def test_an_installed_pillow_heif_still_registers_its_openers(tmp_path):
    (tmp_path / "pillow_heif.py").write_text(
        "calls = []\n"
        "def register_heif_opener(): calls.append('heif')\n"
        "def register_avif_opener(): calls.append('avif')\n"
    )
    out = run(DECODE + "\nimport pillow_heif; print(len(pillow_heif.calls))", str(tmp_path))
    assert int(out) == 100  # imageio registered both openers for each of the 50 images
