"""A labelled contact sheet of views (PIL only, no matplotlib), and the bundled sample image."""

from __future__ import annotations

from importlib import resources

from PIL import Image, ImageDraw, ImageFont

from cppo.perturb.image import to_rgb

LABEL_LINES = 2


def sample_image() -> Image.Image:
    """The bundled 256×256 sample photo (scikit-image's "astronaut", NASA, public domain)."""
    with resources.files("cppo").joinpath("assets/sample.png").open("rb") as f:
        img = Image.open(f)
        img.load()
        return to_rgb(img)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return (lines + [line])[:LABEL_LINES]


def contact_sheet(tiles: list[tuple[str, Image.Image]], columns: int = 4, tile: int = 256) -> Image.Image:
    """Tiles (label, RGB image) on a grid, each image fit into tile×tile and labelled below it."""
    font = _font(13)
    line_h = 16
    label_h = LABEL_LINES * line_h + 6
    columns = max(1, min(columns, len(tiles)))  # more columns than tiles would only widen a blank sheet
    rows = -(-len(tiles) // columns)
    sheet = Image.new("RGB", (columns * tile, rows * (tile + label_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (label, img) in enumerate(tiles):
        x, y = (i % columns) * tile, (i // columns) * (tile + label_h)
        thumb = img.copy()
        thumb.thumbnail((tile - 8, tile - 8), Image.BILINEAR)
        sheet.paste(thumb, (x + (tile - thumb.width) // 2, y + (tile - thumb.height) // 2))
        for j, text in enumerate(_wrap(draw, label, font, tile - 8)):
            draw.text((x + 4, y + tile + 2 + j * line_h), text, fill="black", font=font)
    return sheet
