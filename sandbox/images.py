"""Result images: a real PNG per task and index, coloured by the task id, showing the prompt."""

from __future__ import annotations

import hashlib
import io
import textwrap
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

LONG_SIDE = 512
SIZES: dict[str, tuple[int, int]] = {
    "square": (LONG_SIDE, LONG_SIDE),
    "square_hd": (LONG_SIDE, LONG_SIDE),
    "portrait_4_3": (LONG_SIDE * 3 // 4, LONG_SIDE),
    "portrait_16_9": (LONG_SIDE * 9 // 16, LONG_SIDE),
    "landscape_4_3": (LONG_SIDE, LONG_SIDE * 3 // 4),
    "landscape_16_9": (LONG_SIDE, LONG_SIDE * 9 // 16),
}
DEFAULT_SIZE = "square_hd"
MARGIN = 24
PROMPT_FONT_SIZE = 22
CAPTION_FONT_SIZE = 12
LINE_SPACING = 1.25
CACHE_ENTRIES = 256
DARK_TEXT = (20, 20, 20)
LIGHT_TEXT = (245, 245, 245)
BRIGHTNESS_SPLIT = 140
ELLIPSIS = "…"


@lru_cache(maxsize=CACHE_ENTRIES)
def render_png(task_id: str, index: int, prompt: str, image_size: str = DEFAULT_SIZE) -> bytes:
    """The PNG bytes of result image ``index`` of a task; rendered once, then cached.

    :param task_id: the upstream task id; it picks the colour and is printed small.
    :param index: position of the image among the task's results.
    :param prompt: the task's prompt, wrapped onto the canvas.
    :param image_size: one of the kie.ai ``image_size`` names; it sets the aspect ratio.
    """
    width, height = SIZES.get(image_size, SIZES[DEFAULT_SIZE])
    background = canvas_colour(task_id, index)
    ink = DARK_TEXT if sum(background) / 3 > BRIGHTNESS_SPLIT else LIGHT_TEXT
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    caption_font = _font(CAPTION_FONT_SIZE)
    caption_top = height - MARGIN - CAPTION_FONT_SIZE
    _draw_prompt(draw, prompt, width, caption_top - MARGIN, ink)
    draw.text((MARGIN, caption_top), f"{task_id} #{index}", fill=ink, font=caption_font)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def canvas_colour(task_id: str, index: int) -> tuple[int, int, int]:
    """The background colour of an image, derived from a hash of the task id and index.

    :param task_id: the upstream task id.
    :param index: position of the image among the task's results.
    """
    digest = hashlib.sha256(f"{task_id}:{index}".encode()).digest()
    return digest[0], digest[1], digest[2]


@lru_cache(maxsize=4)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled font at ``size`` pixels."""
    return ImageFont.load_default(size=size)


def _draw_prompt(
    draw: ImageDraw.ImageDraw, prompt: str, width: int, bottom: int, ink: tuple[int, int, int]
) -> None:
    """Write the prompt wrapped to the canvas width, cut with an ellipsis above ``bottom``."""
    font = _font(PROMPT_FONT_SIZE)
    line_height = int(PROMPT_FONT_SIZE * LINE_SPACING)
    max_lines = max(1, (bottom - MARGIN) // line_height)
    lines = wrap_text(prompt, font.getlength("n"), width - 2 * MARGIN, max_lines)
    for number, line in enumerate(lines):
        draw.text((MARGIN, MARGIN + number * line_height), line, fill=ink, font=font)


def wrap_text(text: str, char_width: float, line_width: int, max_lines: int) -> list[str]:
    """Split ``text`` into at most ``max_lines`` lines that fit ``line_width`` pixels.

    :param text: the text to wrap; whitespace runs collapse.
    :param char_width: the average width of one character, in pixels.
    :param line_width: the width available to one line, in pixels.
    :param max_lines: the number of lines that fit; the last one ends in an ellipsis
        when the text is longer.
    """
    chars_per_line = max(1, int(line_width // max(char_width, 1.0)))
    lines = textwrap.wrap(text, width=chars_per_line) or [""]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: chars_per_line - 1] + ELLIPSIS
    return lines
