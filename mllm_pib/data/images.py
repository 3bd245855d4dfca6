"""Finding and opening images safely.

Visual Genome images are found through ``image_data.json`` (its ``url`` names ``VG_100K/…`` or
``VG_100K_2/…``); any other folder is searched for ``{image_id}.{jpg,jpeg,png}``. A path a
record names (``../secret.png``, ``/etc/…``, a symlink to elsewhere) must lead, once its
symlinks are resolved, to a file inside the image root, unless outside paths are allowed.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from PIL import Image

from mllm_pib.errors import UserError

SUFFIXES = (".jpg", ".jpeg", ".png")
ALLOW_HINT = "set allow_outside_images: true (or pass --allow-outside-images) to use images outside it"


def max_pixels() -> int:
    """Images above this many pixels are refused as decompression bombs: Pillow's limit,
    ``PIL.Image.MAX_IMAGE_PIXELS`` (89,478,485 by default, e.g. 9459 x 9459), read when used."""
    return Image.MAX_IMAGE_PIXELS


class ImageError(ValueError):
    """An image that cannot be used; the message says why."""


class ImageOutsideRoot(ImageError, UserError):
    """An image path that leads outside its image root."""


def inside_root(root: str | Path, name: str | Path, allow_outside: bool = False) -> Path:
    """``root / name``, with its symlinks resolved, refused when it leaves ``root`` (resolved too)
    unless ``allow_outside``. The resolved path is returned, so that the checked file is the one
    opened."""
    path = Path(root) / name
    if allow_outside:
        return path
    real, base = path.resolve(), Path(root).resolve()
    if real != base and base not in real.parents:
        raise ImageOutsideRoot(f"{str(name)!r} leads to {real}, outside the image root {base}; {ALLOW_HINT}")
    return real


class ImageResolver:
    """Maps an image id (or a path relative to ``root``) to a file under ``root``; a path leading
    outside it raises :class:`ImageOutsideRoot` unless ``allow_outside``."""

    def __init__(self, root: str | Path, allow_outside: bool = False):
        self.root = Path(root)
        self.allow_outside = allow_outside
        self.vg_paths: dict[str, Path] = {}
        index = self.root / "image_data.json"
        if index.is_file():
            for entry in json.loads(index.read_text()):
                parts = entry["url"].rstrip("/").split("/")
                self.vg_paths[str(entry["image_id"])] = Path(parts[-2]) / parts[-1]

    def __call__(self, image: str | int) -> Path:
        return inside_root(self.root, self._relative(str(image)), self.allow_outside)

    def _relative(self, key: str) -> Path | str:
        if key in self.vg_paths:
            return self.vg_paths[key]
        if Path(key).suffix.lower() in SUFFIXES or (self.root / key).is_file():
            return key
        for suffix in SUFFIXES:
            if (self.root / f"{key}{suffix}").is_file():
                return f"{key}{suffix}"
        return f"{key}.jpg"


def open_image(path: str | Path) -> Image.Image:
    """Open, fully decode and convert an image to RGB; every failure is an :class:`ImageError`."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image file not found: {path}")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # Pillow's check, at max_pixels()
        try:
            with Image.open(path) as image:
                if image.width == 0 or image.height == 0:
                    raise ImageError(f"empty image: {path}")
                image.load()
                return to_rgb(image)
        except ImageError:
            raise
        except (Image.DecompressionBombWarning, Image.DecompressionBombError):
            raise ImageError(f"image too large: more than {max_pixels():,} pixels (the decompression bomb limit): {path}") from None
        except (OSError, ValueError, SyntaxError) as err:
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
