"""Text from files made safe for a terminal: names, paths and messages are data, never control.

A tensor name, a Keras layer name, a config's model name or a shard's file name comes from the
file, that is from whoever made it. Printed raw, an ESC or OSC sequence in it can clear the
screen, set the window title or write a hidden hyperlink, a newline can split an error line in
two, and a bidirectional override can make a name read as another. `printable` shows every such
character as a Python-style escape (`\\x1b`, `\\n`, `\\u202e`), so what a person reads is what the
file holds. Machine formats keep the exact text: JSON escapes by its own rules, CSV quotes.
"""

from __future__ import annotations

import re

_UNSAFE = re.compile(
    "["
    "\x00-\x1f\x7f-\x9f"  # C0 and C1 controls, DEL (ESC, CSI, OSC, BEL, newline, tab...)
    "\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff"  # invisible and bidi controls
    "\ud800-\udfff"  # lone surrogates: not text at all, and not encodable
    "]"
)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    if code == 0x0A:
        return "\\n"
    if code == 0x0D:
        return "\\r"
    if code == 0x09:
        return "\\t"
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}"


def printable(text: str) -> str:
    """`text` with every control, invisible-formatting and lone-surrogate character escaped
    (`\\x1b`, `\\n`, `\\u202e`, `\\udc80`); other text, including non-ASCII letters, unchanged."""
    return _UNSAFE.sub(_escape, text)


def encodable(text: str) -> str:
    """`text` with lone surrogates written as `\\udc80` escapes, so that it can be encoded as
    UTF-8 (for CSV, which otherwise keeps names exactly)."""
    if not _has_surrogate(text):
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
