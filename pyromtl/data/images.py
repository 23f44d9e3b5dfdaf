"""Reading image files into small fixed-size arrays for the benchmark loaders (Pillow)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

#: Pillow modes by channel count.
MODES = {1: "L", 3: "RGB"}


def check_size(size, what: str = "size") -> int:
    """``size`` as a positive side length in pixels, or ``ValueError``."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 4 <= size <= 1024:
        raise ValueError(f"{what} must be an integer side length in [4, 1024] pixels, got {size!r}")
    return int(size)


def read_image(path: str | Path, size: int, channels: int = 3) -> tuple[np.ndarray, tuple[int, int]]:
    """One image as ``float32 [channels, size, size]`` in ``[0, 1]`` (bilinear resize, aspect ratio
    not kept), and its original ``(width, height)``.

    An unreadable or truncated file raises ``ValueError`` naming it.
    """
    try:
        with Image.open(path) as im:
            original = im.size
            resized = im.convert(MODES[channels]).resize((size, size), Image.Resampling.BILINEAR)
            pixels = np.asarray(resized, dtype=np.float32) / 255.0
    except FileNotFoundError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError) as err:  # Pillow raises SyntaxError for some corrupt files
        raise ValueError(f"{path}: cannot read the image ({err})") from None
    return (pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)), original


def read_images(paths: list[Path], size: int, channels: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Stack :func:`read_image` of every path: ``float32 [N, channels, size, size]`` and sizes ``[N, 2]``."""
    out = np.empty((len(paths), channels, size, size), dtype=np.float32)
    sizes = np.empty((len(paths), 2), dtype=np.int64)
    for i, path in enumerate(paths):  # data preparation, once per load
        out[i], sizes[i] = read_image(path, size, channels)
    return out, sizes
