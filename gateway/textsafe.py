"""Text that came from a node or from the file system, made safe to show on a terminal.

A member's reference, series or error message, and a seized file's name, are
data. Shown raw they can act on the investigator's screen: rich markup
(``NL-[bold]0001`` shown as ``NL-0001``, ``[/]`` crashing the renderer), ANSI
escape sequences that recolour or rewrite what is already printed, other
control characters, and bidirectional overrides (U+202E) that show a name
reversed. Each such character is shown visibly escaped instead (``\\x1b``,
``\\u202e``), and table cells are built as rich ``Text`` objects, which rich
never parses as markup.

Everything the gateway prints that it did not write itself goes through
:func:`terminal_safe` (plain ``print``) or :func:`cell` (rich tables, consoles).
"""

from __future__ import annotations

import unicodedata

from rich.text import Text

# Bidirectional embeddings, overrides, isolates and marks (Unicode TR 9).
_BIDI = frozenset(
    [0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)]
)


def _escaped(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def _unsafe(char: str) -> bool:
    code = ord(char)
    if code in _BIDI:
        return True
    # Cc: C0/C1 controls and DEL (ESC starts ANSI sequences, CR overwrites the line);
    # Cf: other invisible format characters (zero-width joiners, BOM, tag characters);
    # Zl/Zp: line and paragraph separators; Cs: lone surrogates from undecodable names.
    return unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp", "Cs")


def terminal_safe(text: object) -> str:
    """``text`` as a string with every control, format or bidi character visibly escaped.

    Printable text (any script) is unchanged; rich markup is not touched here, so
    print the result with plain ``print`` or as a :func:`cell`, never as markup.
    """
    value = str(text)
    if all(char.isprintable() and ord(char) not in _BIDI for char in value):
        return value
    return "".join(_escaped(char) if _unsafe(char) else char for char in value)


def cell(text: object, style: str = "") -> Text:
    """A rich renderable showing ``text`` literally: no markup, no emoji codes, escapes visible."""
    return Text(terminal_safe(text), style=style)
