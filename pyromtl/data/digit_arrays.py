"""The deterministic image work behind the embedded digits datasets, returned as named arrays.

Everything here depends only on scikit-learn's bundled digits and fixed construction seeds,
so :mod:`pyromtl.data.embedded` caches these arrays on disk and imports this module (with
scikit-learn and ``scipy.ndimage``) only when an entry is missing. Images are ``[N, 8, 8]``
in ``[0, 1]`` (pixel values 0..16 scaled); returned inputs are flattened ``float32``.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy import ndimage
from sklearn.datasets import load_digits

from pyromtl.data.digit_tasks import overlay_pairs

# Construction seeds: fixed, and different per dataset, so no two share random draws.
DOMAINS_SEED = 1001
ROTATION_SEED = 1002
MIXED_SEED = 1003
REGRESSION_SEED = 1005
OVERLAY_SEED = 1006
CONFLICT_SEED = 1007

#: The overlay frame: two 8x8 digits, one placed near the top-left and one near the bottom-right.
OVERLAY_SIZE = 12


@lru_cache(maxsize=1)
def digits() -> tuple[np.ndarray, np.ndarray]:
    """``(images [1797, 8, 8] in [0, 1], labels [1797])``, read-only (shared by every builder)."""
    raw = load_digits()
    images = (raw.images / 16.0).astype(np.float32)
    labels = raw.target.astype(np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def flat(images: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(images.reshape(len(images), -1), dtype=np.float32)


def rotate(images: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """Rotate each image by its angle in degrees (bilinear, same 8x8 frame, zero fill)."""
    out = np.stack([ndimage.rotate(im, float(a), reshape=False, order=1) for im, a in zip(images, angles)])
    return np.clip(out, 0.0, 1.0)  # interpolation round-off can step a hair outside [0, 1]


def plain() -> dict[str, np.ndarray]:
    """The images as they are: ``x [1797, 64]`` and ``digit [1797]``."""
    images, labels = digits()
    return {"x": flat(images), "digit": labels}


def domains() -> dict[str, np.ndarray]:
    """Four disjoint shuffled quarters under their shifts: ``x0..x3`` and ``y0..y3``."""
    images, labels = digits()
    parts = np.array_split(np.random.default_rng(DOMAINS_SEED).permutation(len(images)), 4)
    shifts = [
        lambda im: im,
        lambda im: ndimage.gaussian_filter(im, sigma=(0.0, 1.0, 1.0)),
        lambda im: np.roll(im, 1, axis=2),
        lambda im: ndimage.grey_dilation(im, size=(1, 2, 2)),
    ]
    out = {}
    for t, (shift, idx) in enumerate(zip(shifts, parts)):
        out[f"x{t}"] = flat(shift(images[idx]))
        out[f"y{t}"] = labels[idx]
    return out


def rotation() -> dict[str, np.ndarray]:
    """Every image rotated by one of 0, 10, ..., 90 degrees: ``x``, ``angle``, ``digit``."""
    images, labels = digits()
    angles = np.random.default_rng(ROTATION_SEED).integers(0, 10, size=len(images)) * 10.0
    return {"x": flat(rotate(images, angles)), "angle": angles, "digit": labels}


def mixed() -> dict[str, np.ndarray]:
    """Every image rotated by an angle uniform in [-45, 45] degrees: ``x``, ``angle``, ``digit``."""
    images, labels = digits()
    angles = np.random.default_rng(MIXED_SEED).uniform(-45.0, 45.0, size=len(images))
    return {"x": flat(rotate(images, angles)), "angle": angles, "digit": labels}


def regression() -> dict[str, np.ndarray]:
    """Images under a random rotation, scaling and shift, with five continuous properties.

    ``angle`` (degrees, uniform in [-30, 30]) and ``scale`` (uniform in [0.8, 1.2]) are the drawn
    transform; ``ink`` (the summed pixel values) and ``row`` / ``col`` (the centre of mass, in
    pixels) are measured on the transformed image, so every target is a property of the input.
    """
    images, labels = digits()
    rng = np.random.default_rng(REGRESSION_SEED)
    n = len(images)
    angles = rng.uniform(-30.0, 30.0, size=n)
    scales = rng.uniform(0.8, 1.2, size=n)
    shifts = rng.uniform(-1.0, 1.0, size=(n, 2))
    centre = np.array([3.5, 3.5])
    out = np.empty_like(images)
    for i in range(n):  # data preparation, once per machine (cached)
        a = np.deg2rad(angles[i])
        # affine_transform maps output to input coordinates: undo the shift, scale and rotation
        inverse = np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]]) / scales[i]
        offset = centre - inverse @ (centre + shifts[i])
        out[i] = ndimage.affine_transform(images[i], inverse, offset=offset, order=1)
    out = np.clip(out, 0.0, 1.0)
    ink = out.sum(axis=(1, 2))
    grid = np.arange(8, dtype=np.float64)
    row = (out.sum(axis=2) @ grid) / ink
    col = (out.sum(axis=1) @ grid) / ink
    return {"x": flat(out), "angle": angles, "scale": scales, "ink": ink, "row": row, "col": col, "digit": labels}


def overlay() -> dict[str, np.ndarray]:
    """Pairs of digits overlaid in a 12x12 frame: ``x [1797, 144]``, ``first``, ``second``.

    Image ``i`` goes at a top-left offset of 0 or 1 pixel per axis, and the image a fixed
    permutation pairs it with goes at an offset of 3 or 4 pixels (so the two overlap over a
    5x5 to 7x7 block); where they overlap the brighter pixel wins.
    """
    images, labels = digits()
    rng = np.random.default_rng(OVERLAY_SEED)
    n = len(images)
    partner = rng.permutation(n)
    near = rng.integers(0, 2, size=(n, 2))
    far = rng.integers(3, 5, size=(n, 2))
    frame = overlay_pairs(images, partner, near, far, OVERLAY_SIZE)
    return {"x": flat(frame), "first": labels, "second": labels[partner]}


def conflict() -> dict[str, np.ndarray]:
    """Images rotated by 5-20 degrees either way: ``x``, ``digit``, ``clockwise``.

    Within every digit, half the images (chosen with a fixed seed) turn clockwise, so the
    direction carries no information about the digit and vice versa.
    """
    images, labels = digits()
    rng = np.random.default_rng(CONFLICT_SEED)
    clockwise = np.zeros(len(images), dtype=np.int64)
    for d in range(10):
        pos = rng.permutation(np.flatnonzero(labels == d))
        clockwise[pos[: len(pos) // 2]] = 1
    magnitude = rng.uniform(5.0, 20.0, size=len(images))
    angles = np.where(clockwise == 1, -magnitude, magnitude)  # ndimage.rotate turns counter-clockwise
    return {"x": flat(rotate(images, angles)), "digit": labels, "clockwise": clockwise}
