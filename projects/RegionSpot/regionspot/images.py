"""Images as SAM and CLIP expect them: 8-bit values in [0, 255]. Every entry point (dataset
mapper, predictor, demo, token extraction) reads and converts images through this module.

detectron2's `read_image` converts through PIL, which clips a 16-bit grayscale PNG (PIL mode
"I;16") to 255 instead of scaling it. `read_image` here scales such images by 255/65535 and
otherwise defers to detectron2. `to_uint8_image` gives arrays of other dtypes their one sensible
meaning, or refuses them with an error naming the dtype and the value range.
"""
from typing import Optional

import numpy as np
from detectron2.data import detection_utils as utils
from detectron2.utils.file_io import PathManager
from PIL import Image, ImageOps

# PIL modes of 16-bit single-channel images (PNG, TIFF). Pillow reads 16-bit RGB(A) PNGs as 8-bit
# RGB(A) itself (keeping the high byte), so those need nothing from us.
_16BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# 32-bit modes with no defined range: PIL would clip them to [0, 255] too.
_UNDEFINED_RANGE_MODES = {"I": "32-bit integer", "F": "32-bit float"}


def _is_16bit(image: Image.Image) -> bool:
    # PNG has no 32-bit pixels: its "I" images (older Pillow) are 16-bit too.
    return image.mode in _16BIT_MODES or (image.mode == "I" and image.format == "PNG")


def pil_to_numpy(image: Image.Image, format: Optional[str] = "RGB", where: str = "The image") -> np.ndarray:
    """A PIL image as an (H, W, C) array in `format` (see detectron2's `convert_PIL_to_numpy`),
    with 16-bit grayscale scaled by 255/65535 rather than clipped. 32-bit integer or float
    images ("I", "F" outside PNG) have no defined range and raise ValueError naming `where`."""
    if _is_16bit(image):
        values = np.asarray(image).astype(np.float64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(f"{where} is a 16-bit image with values outside [0, 65535].")
        image = Image.fromarray(np.rint(values * (255.0 / 65535.0)).astype(np.uint8), mode="L")
    elif image.mode in _UNDEFINED_RANGE_MODES:
        raise ValueError(f"{where} has {_UNDEFINED_RANGE_MODES[image.mode]} pixels (PIL mode {image.mode!r}) "
                         "whose range is not defined: convert it to an 8-bit or 16-bit image.")
    return utils.convert_PIL_to_numpy(image, format)


def read_image(file_name: str, format: Optional[str] = "RGB") -> np.ndarray:
    """detectron2's `read_image` (EXIF orientation applied; HWC uint8 in `format`), except that
    16-bit grayscale images are scaled to [0, 255] instead of clipped at 255, and 32-bit
    integer/float images, which have no defined range, raise ValueError naming the file."""
    with PathManager.open(file_name, "rb") as f:
        image = Image.open(f)  # reads the header only
        if not _is_16bit(image) and image.mode not in _UNDEFINED_RANGE_MODES:
            return utils.read_image(file_name, format=format)
        return pil_to_numpy(ImageOps.exif_transpose(image), format, f"Image {file_name}")


def to_uint8_image(array: np.ndarray, where: str = "The image") -> np.ndarray:
    """Pixel values as uint8 in [0, 255], converting only what has one sensible meaning:

    - uint8: as it is;
    - uint16: 16-bit values, scaled by 255/65535;
    - other integer dtypes with every value in [0, 255]: 8-bit values;
    - floats with every value in [0, 1] (torchvision's convention): scaled by 255.

    Everything else raises ValueError naming `where`, the dtype and the value range: bool, NaN
    or infinite values, negative values, floats above 1 (is it [0, 1] or [0, 255]? pass uint8
    for [0, 255] values), integers above 255 other than uint16, and non-numeric dtypes.
    """
    a = np.asarray(array)
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_ or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise ValueError(f"{where} has dtype {a.dtype}: give uint8 (or uint16, or float in [0, 1]) pixel values.")
    if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
        raise ValueError(f"{where} has NaN or infinite pixel values.")
    lo, hi = (a.min(), a.max()) if a.size else (0, 0)
    span = f"values in [{lo}, {hi}]"
    if lo < 0:
        raise ValueError(f"{where} has negative pixel values (dtype {a.dtype}, {span}): give uint8 values "
                         "in [0, 255] or floats in [0, 1].")
    if a.dtype == np.uint16:
        return np.rint(a.astype(np.float64) * (255.0 / 65535.0)).astype(np.uint8)
    if np.issubdtype(a.dtype, np.integer):
        if hi > 255:
            raise ValueError(f"{where} has dtype {a.dtype} with {span}: 8-bit values must be at most 255 "
                             "(give 16-bit images as uint16).")
        return a.astype(np.uint8)
    if hi > 1:
        raise ValueError(f"{where} has dtype {a.dtype} with {span}: float images must be in [0, 1]. For "
                         "values in [0, 255], pass them as uint8 (e.g. np.rint(image).astype(np.uint8)).")
    return np.rint(a.astype(np.float64) * 255.0).astype(np.uint8)
