"""Tensor encodings for the REST API: base64 of little-endian float32 (with a shape), or base64 .npy bytes."""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np
from PIL import Image

from danceopd.contracts import QueryError


def encode_array(a: np.ndarray) -> dict:
    a = np.ascontiguousarray(a, dtype="<f4")
    return {"b64": base64.b64encode(a.tobytes()).decode(), "shape": list(a.shape), "dtype": "float32"}


def decode_array(obj: dict, field: str) -> np.ndarray:
    """{"b64": ..., "shape": [...], "dtype": "float32"} or {"npy_b64": ...} -> float32 array."""
    if not isinstance(obj, dict):
        raise QueryError(field, "must be an object with 'b64' + 'shape' (little-endian float32) or 'npy_b64'")
    try:
        if "npy_b64" in obj:
            arr = np.load(io.BytesIO(base64.b64decode(obj["npy_b64"], validate=True)), allow_pickle=False)
            if arr.dtype != np.float32:
                raise QueryError(field, f"dtype must be float32, got {arr.dtype}")
            return arr.astype("=f4", copy=False)
        if "b64" not in obj or "shape" not in obj:
            raise QueryError(field, "needs 'b64' and 'shape' (or 'npy_b64')")
        dtype = obj.get("dtype", "float32")
        if dtype != "float32":
            raise QueryError(field, f"dtype must be float32, got {dtype!r}")
        raw = base64.b64decode(obj["b64"], validate=True)
        shape = [int(s) for s in obj["shape"]]
        if any(s < 0 for s in shape) or len(raw) != 4 * int(np.prod(shape)):
            raise QueryError(field, f"{len(raw)} bytes do not hold float32 of shape {shape} ({4 * int(np.prod(shape))} bytes)")
        return np.frombuffer(raw, dtype="<f4").reshape(shape).astype("=f4")
    except QueryError:
        raise
    except (binascii.Error, ValueError, TypeError, OSError) as e:
        raise QueryError(field, f"could not decode: {e}") from None


def image_png_b64(image_chw: np.ndarray, scale: int = 4) -> str:
    """A [C, H, W] image in [-1, 1] (C = 3 shown as RGB; other C: first channel as grey) as base64 PNG."""
    img = np.clip((image_chw + 1.0) * 127.5, 0, 255).round().astype(np.uint8)
    pil = Image.fromarray(img.transpose(1, 2, 0)) if img.shape[0] == 3 else Image.fromarray(img[0])
    pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()
