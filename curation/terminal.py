"""Text from the data shown on a terminal: `printable` escapes what could drive the terminal or forge a line."""

# C0 and C1 controls and DEL (tab and newlines too: a line holds one value or one log record) as Python escapes; the
# bidi embedding, override and isolate characters and the Unicode line and paragraph separators as \uNNNN. Other
# Unicode is shown as it is.
_ESCAPES = {
    **{code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7F, 0xA0))},
    **{ord(char): escape for char, escape in (("\t", "\\t"), ("\n", "\\n"), ("\r", "\\r"))},
    **{code: f"\\u{code:04x}" for code in (*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x2028, 0x2029)},
}


def printable(text: str) -> str:
    """`text` with its control, bidi and line-separator characters escaped, so that a crawled caption, url or file
    name cannot drive the terminal (an OSC 52 clipboard write, a screen clear), reorder what is shown around it or
    start a forged line."""
    return text.translate(_ESCAPES)
