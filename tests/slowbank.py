"""A bank type whose images take a set time to decode, for tests that stop a build midway.

Importable by workers and Slurm jobs when ``tests/`` is on ``PYTHONPATH``;
the delay per source is ``H5BANK_TEST_DELAY`` seconds (default 0.05).
"""

from __future__ import annotations

import os
import time

from features import DirLabels, Image
from pipeline import TypedFile


class SlowImage(Image):
    """An ``Image`` that sleeps before decoding each source."""

    def decode(self, data: bytes, name: str = ""):
        time.sleep(float(os.environ.get("H5BANK_TEST_DELAY", "0.05")))
        return super().decode(data, name)


class SlowBank(TypedFile):
    pixels = SlowImage(size=(32, 32), mode="RGB")
    labels = DirLabels()


class QuickBank(TypedFile):
    """``SlowBank``'s features without the delay: the bank it builds is the same."""

    pixels = Image(size=(32, 32), mode="RGB")
    labels = DirLabels()


class CrashingImage(Image):
    """An ``Image`` whose decoder takes its whole process down on sources named ``crash*``
    (what a segfaulting decoder or the kernel's out-of-memory killer does to a worker)."""

    def decode(self, data: bytes, name: str = ""):
        if os.path.basename(name).startswith("crash"):
            os._exit(1)
        return super().decode(data, name)


class CrashingBank(TypedFile):
    pixels = CrashingImage(size=(32, 32), mode="RGB")
    labels = DirLabels()
