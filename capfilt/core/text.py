"""User data on a terminal: shown as written, never acted on."""

from __future__ import annotations

import re

# C0 and C1 control characters but tab and newline: a terminal acts on them (colours, cursor
# moves, a changed window title), so they are shown as \xNN instead.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(value) -> str:
    """`value` as text, its control characters (terminal escapes) written as \\xNN."""
    text = str(value)
    if _CONTROL.search(text):
        text = _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)
    return text
