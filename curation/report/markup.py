"""HTML building blocks of the report: escaping, number formats, tables, inline images and the page's style."""

import base64
import html
import io
import json
import logging
import math

logger = logging.getLogger(__name__)


THUMBNAIL_PIXELS = 96


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def fmt_int(value) -> str:
    return f"{int(value):,}" if value is not None else ""


def fmt_float(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return f"{value:.{digits}g}" if isinstance(value, float) else esc(value)


def fmt_value(value) -> str:
    """A record value for a table cell: integers with thousands separators, floats to 6 significant digits,
    lists and objects as compact JSON; escaped."""
    if isinstance(value, bool) or value is None:
        return esc(value)
    if isinstance(value, int):
        return fmt_int(value)
    if isinstance(value, float):
        return esc(f"{value:.6g}")
    if isinstance(value, list | dict):
        return esc(json.dumps(value, sort_keys=True, ensure_ascii=False, default=str))
    return esc(value)


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def img(png: bytes, alt: str, css_class: str = "plot") -> str:
    return f'<img class="{css_class}" alt="{esc(alt)}" src="{data_uri(png)}">'


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def absent(stage_names: str) -> str:
    return f'<p class="absent">Not in this run: no {esc(stage_names)} stage.</p>'


def table(headers: list[str], rows: list[list[str]], css_class: str = "", row_attributes: list[str] | None = None,
          numeric: set[int] | None = None) -> str:
    """An HTML table; cells are already HTML (escape data before), columns in `numeric` right-aligned."""
    numeric = numeric or set()
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for index, row in enumerate(rows):
        attributes = f" {row_attributes[index]}" if row_attributes else ""
        cells = "".join(f'<td class="num">{cell}</td>' if i in numeric else f"<td>{cell}</td>"
                        for i, cell in enumerate(row))
        body.append(f"<tr{attributes}>{cells}</tr>")
    return f'<table class="{css_class}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def key_values(pairs: list[tuple[str, str]]) -> str:
    """A two-column table of already-escaped values."""
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in pairs)
    return f'<table class="kv"><tbody>{rows}</tbody></table>'


def thumbnail(data: bytes | None) -> bytes | None:
    """A PNG of at most THUMBNAIL_PIXELS on its longer side, or None when the bytes are not a readable image."""
    from PIL import Image

    if not data:
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))
            converted = image.convert("RGBA" if image.mode in ("RGBA", "LA", "P") else "RGB")
            buffer = io.BytesIO()
            converted.save(buffer, format="PNG", optimize=True)
            return buffer.getvalue()
    except Exception as error:  # noqa: BLE001 - any undecodable image becomes a placeholder
        logger.debug("report: unreadable thumbnail (%s)", error)
        return None


STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:1.5em auto;max-width:1200px;
color:#222;padding:0 1em;line-height:1.4}
h1{margin-bottom:0.2em}h2{border-bottom:2px solid #4878a8;padding-bottom:0.2em;margin-top:2em}
h3{margin-top:1.5em}code{font-size:0.9em;background:#f2f2f2;padding:0 0.2em}
table{border-collapse:collapse;margin:0.8em 0;font-size:0.9em}
th,td{border:1px solid #ccc;padding:0.25em 0.6em;text-align:left;vertical-align:top}
thead th{background:#eef2f7}td.num{text-align:right;font-variant-numeric:tabular-nums}
table.kv th{background:#f6f6f6;font-weight:normal}
img.plot,img.sheet{max-width:100%;height:auto;display:block;margin:0.8em 0}
p.absent{color:#777;font-style:italic}p.note{color:#555;font-size:0.9em}
p.error{color:#a00}nav a{margin-right:1em}
.pair{display:flex;flex-wrap:wrap;gap:2em}
.group{margin:0.8em 0;padding:0.5em;border:1px solid #ddd}.group p{margin:0.2em 0}
.strip{display:flex;flex-wrap:wrap;gap:0.6em}
figure{margin:0;width:112px;font-size:0.72em;word-wrap:break-word}
figure img.thumb{display:block;border:3px solid #ccc;max-width:96px;max-height:96px}
figure.kept img.thumb{border-color:#58a058}figure.dropped img.thumb{border-color:#c06040}
div.missing{width:96px;height:96px;background:#eee;color:#777;display:flex;align-items:center;
justify-content:center}
"""
