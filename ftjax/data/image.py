"""Image preprocessing as HF ViT image processors do it: RGB, bilinear resize to size x size, /255, (x-mean)/std.

Images stay encoded (paths or bytes) until their batch is built, so only a batch's worth is ever decoded.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
from PIL import Image

from ftjax.data.errors import DataError, DataFileNotFoundError


def open_image(value: Any, field_value: str) -> Image.Image:
    """A PIL image from a path, encoded bytes, an HF {"bytes", "path"} dict, an HWC array or a PIL image."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, np.ndarray) and value.dtype.kind in "uif":
        array = value.squeeze(-1) if value.ndim == 3 and value.shape[-1] == 1 else value
        return Image.fromarray(array.astype(np.uint8))
    if isinstance(value, np.ndarray) and value.dtype == object and value.size == 1:
        value = value.item()
    if isinstance(value, (bytes, np.bytes_)):
        try:
            return Image.open(io.BytesIO(bytes(value)))
        except OSError as e:
            raise DataError(f"data.image_field={field_value!r}: an image could not be decoded ({e})") from e
    if isinstance(value, (str, os.PathLike)):
        try:
            return Image.open(value)
        except FileNotFoundError as e:
            raise DataFileNotFoundError(
                f"data.image_field={field_value!r}: image file {value} is missing"
            ) from e
        except OSError as e:
            raise DataError(f"data.image_field={field_value!r}: {value} is not a readable image ({e})") from e
    raise DataError(f"data.image_field={field_value!r}: cannot read an image from a {type(value).__name__}")


def pixel_values(
    value: Any, size: int, mean: tuple[float, ...], std: tuple[float, ...], field_value: str = "image"
) -> np.ndarray:
    """float32 [3, size, size], normalised like transformers' ViTImageProcessor (mean = std = 0.5 there)."""
    image = open_image(value, field_value).convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), resample=Image.Resampling.BILINEAR)
    x = np.asarray(image, dtype=np.float32) * (1.0 / 255.0)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))
