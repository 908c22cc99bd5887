"""The contact sheet of mined logos: SLANT's visual check, a PNG grid of logos each with its id and score."""

import io
import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from curation.io import atomic_write_bytes

CONTACT_THUMBNAIL = 96
CONTACT_PADDING = 4
CONTACT_CAPTION_HEIGHT = 28
# (width, height) of one contact-sheet cell: the thumbnail with padding, and two caption lines under it.
CONTACT_CELL = (
    CONTACT_THUMBNAIL + 2 * CONTACT_PADDING,
    CONTACT_THUMBNAIL + 2 * CONTACT_PADDING + CONTACT_CAPTION_HEIGHT,
)
CONTACT_BACKGROUND = (235, 235, 235)


def contact_sheet(
    logos: Sequence[tuple[str, Image.Image]], scores: Sequence[float], path: Path, columns: int = 8
) -> None:
    """Write a PNG grid of `logos` (on light grey, so that white logos show), each with its id and score below
    (SLANT's visual check of mined logos), atomically at `path`. Cells are CONTACT_CELL pixels; the grid has
    min(columns, len(logos)) columns."""
    if len(logos) != len(scores):
        raise ValueError(f"{len(logos)} logos but {len(scores)} scores")
    if not logos or columns < 1:
        raise ValueError("a contact sheet needs at least one logo and one column")
    grid_columns = min(columns, len(logos))
    grid_rows = math.ceil(len(logos) / grid_columns)
    cell_width, cell_height = CONTACT_CELL
    sheet = Image.new("RGB", (grid_columns * cell_width, grid_rows * cell_height), CONTACT_BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for index, ((logo_id, image), score) in enumerate(zip(logos, scores, strict=True)):
        left = (index % grid_columns) * cell_width
        top = (index // grid_columns) * cell_height
        thumbnail = image.convert("RGBA")
        thumbnail.thumbnail((CONTACT_THUMBNAIL, CONTACT_THUMBNAIL), Image.Resampling.LANCZOS)
        offset = (left + CONTACT_PADDING + (CONTACT_THUMBNAIL - thumbnail.width) // 2,
                  top + CONTACT_PADDING + (CONTACT_THUMBNAIL - thumbnail.height) // 2)
        sheet.paste(thumbnail, offset, thumbnail)
        caption_top = top + 2 * CONTACT_PADDING + CONTACT_THUMBNAIL
        draw.text((left + CONTACT_PADDING, caption_top), str(logo_id)[:16], fill=(0, 0, 0))
        draw.text((left + CONTACT_PADDING, caption_top + CONTACT_CAPTION_HEIGHT // 2), f"{score:+.3f}",
                  fill=(0, 0, 0))
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    atomic_write_bytes(Path(path), buffer.getvalue())
