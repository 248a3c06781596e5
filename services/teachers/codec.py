"""Tensor encodings for the REST API: base64 of little-endian float32 (with a shape), or base64 .npy bytes."""

from __future__ import annotations

import base64
import binascii
import io
import math

import numpy as np
from PIL import Image

from danceopd.contracts import QueryError


def encode_array(a: np.ndarray) -> dict:
    a = np.ascontiguousarray(a, dtype="<f4")
    return {"b64": base64.b64encode(a.tobytes()).decode(), "shape": list(a.shape), "dtype": "float32"}


MAX_DIMS = 8  # [B, C, H, W] needs 4; anything deeper is a mistake, not an image


def _shape(raw, field: str) -> tuple[int, ...]:
    """A JSON shape: a list of non-negative integers (1.9, 1e400, "3" and true are refused, not coerced)."""
    if not isinstance(raw, list | tuple) or len(raw) > MAX_DIMS or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in raw):
        shown = repr(raw) if len(repr(raw)) <= 80 else repr(raw)[:77] + "..."
        raise QueryError(field, f"'shape' must be a list of at most {MAX_DIMS} non-negative integers, got {shown}")
    return tuple(raw)


def _check_size(field: str, nbytes: int, shape: tuple[int, ...]) -> None:
    # Compared before any allocation: a claimed shape never sizes memory, the bytes actually sent do.
    want = 4 * math.prod(shape)
    if nbytes != want:
        shown = str(list(shape)) if len(str(list(shape))) <= 80 else str(list(shape))[:77] + "..."
        raise QueryError(field, f"{nbytes} bytes do not hold float32 of shape {shown} ({want} bytes)"[:300])


def _decode_npy(data: bytes, field: str) -> np.ndarray:
    buf = io.BytesIO(data)
    version = np.lib.format.read_magic(buf)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(buf)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(buf)
    else:
        raise QueryError(field, f".npy format version {version} is not supported: save with numpy.save (1.0 or 2.0)")
    if dtype.kind != "f" or dtype.itemsize != 4:
        raise QueryError(field, f"dtype must be float32, got {dtype}")
    shape = _shape(list(shape), field)
    _check_size(field, len(data) - buf.tell(), shape)
    arr = np.frombuffer(data, dtype=dtype, offset=buf.tell()).reshape(shape, order="F" if fortran else "C")
    return arr.astype("=f4", order="C")


def decode_array(obj: dict, field: str) -> np.ndarray:
    """{"b64": ..., "shape": [...], "dtype": "float32"} or {"npy_b64": ...} -> float32 array.

    Every malformed input is a QueryError naming `field` (a 422), never an exception from numpy or base64.
    """
    if not isinstance(obj, dict):
        raise QueryError(field, "must be an object with 'b64' + 'shape' (little-endian float32) or 'npy_b64'")
    try:
        if "npy_b64" in obj:
            data = base64.b64decode(obj["npy_b64"], validate=True)
            if not data:
                raise QueryError(field, "'npy_b64' is empty: send the base64 of numpy.save's bytes")
            return _decode_npy(data, field)
        if "b64" not in obj or "shape" not in obj:
            raise QueryError(field, "needs 'b64' and 'shape' (or 'npy_b64')")
        dtype = obj.get("dtype", "float32")
        if dtype != "float32":
            raise QueryError(field, f"dtype must be float32, got {dtype!r}")
        shape = _shape(obj["shape"], field)
        raw = base64.b64decode(obj["b64"], validate=True)
        _check_size(field, len(raw), shape)
        return np.frombuffer(raw, dtype="<f4").reshape(shape).astype("=f4")
    except QueryError:
        raise
    except (binascii.Error, ValueError, TypeError, OSError, EOFError, SyntaxError) as e:
        raise QueryError(field, f"could not decode: {e}") from None


def image_png_b64(image_chw: np.ndarray, scale: int = 4) -> str:
    """A [C, H, W] image in [-1, 1] (C = 3 shown as RGB; other C: first channel as grey) as base64 PNG."""
    img = np.clip((image_chw + 1.0) * 127.5, 0, 255).round().astype(np.uint8)
    pil = Image.fromarray(img.transpose(1, 2, 0)) if img.shape[0] == 3 else Image.fromarray(img[0])
    pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()
