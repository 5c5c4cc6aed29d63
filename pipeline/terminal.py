"""Text from a bank or a source, made safe to print on a terminal.

Ids, label names, feature paths and error messages come from files someone
else may have written. Printed raw, an ANSI escape sequence in an id could
retitle the terminal window, move the cursor or fake earlier output; a
carriage return could overwrite a line. :func:`printable` shows each control
character as a visible escape instead.
"""

from __future__ import annotations

import re

__all__ = ["printable"]

# C0 controls but tab, DEL, C1 controls, and the Unicode line/paragraph separators and bidi
# overrides, which reorder what a terminal shows.
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(text: object) -> str:
    """``str(text)`` with every control character shown as ``\\xNN`` / ``\\uNNNN``.

    Tabs stay; newlines do not (one id, one line). Plain text passes through
    unchanged, so ordinary ids and messages print as they are.
    """
    text = str(text)
    if not _CONTROL.search(text):
        return text
    return _CONTROL.sub(lambda m: m.group(0).encode("unicode_escape").decode("ascii"), text)
