"""Input files read so that bad input names itself: DataError, and the JSON, JSONL, image and number readers that
data.py's formats and lerobot_format.py share (each names the file, line or row, and field of the first problem).
"""
import io
import json
import os

import numpy as np
from PIL import Image


class DataError(ValueError):
    """Bad input data; the message names the file, line/episode and field."""


def decode_image(source, where):
    """A path or encoded bytes -> RGB PIL image, fully decoded here so corrupt bytes fail now, with context."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"{where}: image file not found: {source}") from None
    except (OSError, ValueError) as e:  # PIL.UnidentifiedImageError and truncated data are OSErrors
        name = "image bytes" if isinstance(source, bytes) else source
        raise DataError(f"{where}: corrupt image {name} ({e})") from None


def _not_utf8(path, e):
    return DataError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})")


def load_json(path):
    """A JSON file's content; DataError naming the file (and line) when it is missing, malformed or not UTF-8."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {e.lineno}: malformed JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from None


def jsonl_rows(path, required=()):
    """Yield (where, row) for each line of a JSONL file; a malformed line or a missing field names the
    file, line and field."""
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path} line {n}: not UTF-8 text (byte {raw[e.start]:#04x} at column "
                                f"{e.start + 1})") from None
            if not line.strip():
                continue
            where = f"{path} line {n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
            missing = [k for k in required if k not in row] if isinstance(row, dict) else ["(not an object)"]
            if missing:
                raise DataError(f"{where}: missing field '{missing[0]}'")
            yield where, row


def float_vector(value, where, dims, key):
    """A flat float32 vector whose length matches the first one seen for `key` (one action width per set)."""
    try:
        v = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise DataError(f"{where}: field '{key}' is not a list of numbers") from None
    if v.ndim != 1:
        raise DataError(f"{where}: field '{key}' should be a flat list, got shape {v.shape}")
    if not np.isfinite(v).all():  # clipped by the normalisation, an inf would train as a plausible value
        i = int(np.flatnonzero(~np.isfinite(v))[0])
        raise DataError(f"{where}: field '{key}' holds {v[i]} at index {i} (values must be finite)")
    if dims.get(key) is None:
        dims[key] = len(v)
    elif len(v) != dims[key]:
        raise DataError(f"{where}: field '{key}' has {len(v)} values, expected {dims[key]}")
    return v
