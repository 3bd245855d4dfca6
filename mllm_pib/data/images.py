"""Finding and opening images safely.

Visual Genome images are found through ``image_data.json`` (its ``url`` names ``VG_100K/…`` or
``VG_100K_2/…``); any other folder is searched for ``{image_id}.{jpg,jpeg,png}``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from PIL import Image

SUFFIXES = (".jpg", ".jpeg", ".png")
# Images above this many pixels are refused (decompression bombs); 16k x 16k is far above any dataset.
MAX_PIXELS = 16384 * 16384


class ImageError(ValueError):
    """An image that cannot be used; the message says why."""


class ImageResolver:
    """Maps an image id (or a relative path) to a file under ``root``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.vg_paths: dict[str, Path] = {}
        index = self.root / "image_data.json"
        if index.is_file():
            for entry in json.loads(index.read_text()):
                parts = entry["url"].rstrip("/").split("/")
                self.vg_paths[str(entry["image_id"])] = self.root / parts[-2] / parts[-1]

    def __call__(self, image: str | int) -> Path:
        key = str(image)
        if key in self.vg_paths:
            return self.vg_paths[key]
        direct = self.root / key
        if direct.suffix.lower() in SUFFIXES or direct.is_file():
            return direct
        for suffix in SUFFIXES:
            candidate = self.root / f"{key}{suffix}"
            if candidate.is_file():
                return candidate
        return self.root / f"{key}.jpg"


def open_image(path: str | Path) -> Image.Image:
    """Open, fully decode and convert an image to RGB; every failure is an :class:`ImageError`."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image file not found: {path}")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as image:
                if image.width * image.height > MAX_PIXELS:
                    raise ImageError(f"image too large ({image.width}x{image.height}): {path}")
                if image.width == 0 or image.height == 0:
                    raise ImageError(f"empty image: {path}")
                image.load()
                return to_rgb(image)
        except ImageError:
            raise
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
            raise ImageError(f"cannot decode image {path}: {err}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB from any PIL mode; transparency is composited on white, 16-bit greys are rescaled."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = image.point(lambda v: v / 256).convert("L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")
