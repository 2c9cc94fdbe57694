"""The numpy adapter: ``dict[str, numpy.ndarray]`` <-> safetensors bytes, with the manifest's
dtypes.

- Float tensors are cast to the manifest dtype with round-to-nearest (``bfloat16`` through
  ml-dtypes); integer tensors must hold integers that fit the dtype exactly (a float array with a
  fractional or out-of-range value is refused, never truncated).
- The payload holds exactly the manifest's tensors, in manifest order, little-endian, C order.
- :func:`delta` and :func:`apply_delta` compute ``new - base`` and ``base + delta`` per tensor in
  float64 for floats (rounded once to the dtype) and exactly for integers.
"""

from __future__ import annotations

import json
import struct
from typing import Mapping, Sequence

import ml_dtypes
import numpy as np
import safetensors

from .messages import TensorSpec

#: numpy dtype of every manifest dtype.
NUMPY_DTYPES: dict[str, np.dtype] = {
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
}

Params = dict[str, np.ndarray]


class TensorMismatch(ValueError):
    """Tensors that do not fit the manifest: a missing or extra name, a wrong shape, or integer
    values that the manifest's integer dtype cannot hold exactly."""


def _contiguous(a: np.ndarray) -> np.ndarray:
    """``a`` in C order, keeping its shape (``np.ascontiguousarray`` turns a scalar into shape (1,))."""
    return a if a.flags.c_contiguous else a.copy(order="C")


def _cast(spec: TensorSpec, value: object) -> np.ndarray:
    arr = np.asarray(value)
    if tuple(arr.shape) != tuple(spec.shape):
        raise TensorMismatch(f"tensor {spec.name!r} has shape {tuple(arr.shape)}, the manifest says {tuple(spec.shape)}")
    target = NUMPY_DTYPES[spec.dtype]
    if arr.dtype == target:
        return _contiguous(arr)
    if spec.is_float:
        if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == NUMPY_DTYPES["BF16"] or arr.dtype == np.bool_):
            raise TensorMismatch(f"tensor {spec.name!r} of dtype {arr.dtype} is not numeric")
        return _contiguous(arr.astype(target))
    # Integer target: exact or refused.
    info = np.iinfo(target)
    if np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_:
        wide = arr.astype(np.int64) if arr.dtype != np.uint64 else arr
        if arr.size and (int(wide.min()) < info.min or int(wide.max()) > info.max):
            raise TensorMismatch(f"tensor {spec.name!r} holds values outside {spec.dtype}")
        return _contiguous(arr.astype(target))
    f = arr.astype(np.float64)
    if arr.size and (not np.all(np.isfinite(f)) or not np.all(f == np.round(f))):
        raise TensorMismatch(f"tensor {spec.name!r} holds non-integer values for dtype {spec.dtype}")
    if arr.size and (f.min() < info.min or f.max() > info.max):
        raise TensorMismatch(f"tensor {spec.name!r} holds values outside {spec.dtype}")
    return _contiguous(f.astype(target))


def encode_safetensors(arrays: Sequence[tuple[str, str, np.ndarray]], metadata: Mapping[str, str] | None = None) -> bytes:
    """A safetensors file of ``(name, dtype label, array)`` in the given order: an 8-byte
    little-endian header length, the JSON header (padded with spaces to a multiple of 8), then
    each tensor's little-endian C-order bytes."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    blobs = []
    for name, dtype, arr in arrays:
        data = np.asarray(arr).tobytes(order="C")
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def to_safetensors(params: Mapping[str, object], tensors: Sequence[TensorSpec]) -> bytes:
    """The safetensors payload of ``params`` for a manifest's ``tensors``: every manifest tensor
    (and no other), cast to its dtype (see the module docs).

    Raises :class:`TensorMismatch`."""
    names = {t.name for t in tensors}
    extra = sorted(set(params) - names)
    if extra:
        raise TensorMismatch(f"tensors not in the manifest: {extra}")
    out = []
    for t in tensors:
        if t.name not in params:
            raise TensorMismatch(f"tensor {t.name!r} of the manifest is missing")
        out.append((t.name, t.dtype, _cast(t, params[t.name])))
    return encode_safetensors(out)


def from_safetensors(data: bytes, tensors: Sequence[TensorSpec] | None = None) -> Params:
    """The tensors of a safetensors payload as numpy arrays (``BF16`` as ``ml_dtypes.bfloat16``),
    copied out of ``data``. With ``tensors`` (a manifest), names, dtypes and shapes are checked
    and the dict follows manifest order. Raises :class:`TensorMismatch` or ``ValueError``."""
    out: Params = {}
    for name, info in safetensors.deserialize(bytes(data)):
        label = info["dtype"]
        if label not in NUMPY_DTYPES:
            raise TensorMismatch(f"tensor {name!r} has unsupported dtype {label}")
        arr = np.frombuffer(bytes(info["data"]), dtype=NUMPY_DTYPES[label]).reshape(info["shape"]).copy()
        out[name] = arr
    if tensors is None:
        return out
    ordered: Params = {}
    for t in tensors:
        if t.name not in out:
            raise TensorMismatch(f"tensor {t.name!r} of the manifest is missing")
        a = out.pop(t.name)
        if a.dtype != NUMPY_DTYPES[t.dtype] or tuple(a.shape) != tuple(t.shape):
            raise TensorMismatch(f"tensor {t.name!r} is {a.dtype}{tuple(a.shape)}, the manifest says {t.dtype}{tuple(t.shape)}")
        ordered[t.name] = a
    if out:
        raise TensorMismatch(f"tensors not in the manifest: {sorted(out)}")
    return ordered


def delta(new: Mapping[str, object], base: Mapping[str, np.ndarray], tensors: Sequence[TensorSpec]) -> Params:
    """``new - base`` per manifest tensor, in the manifest dtype: floats computed in float64 and
    rounded once; integers exactly (a difference the dtype cannot hold is refused)."""
    out: Params = {}
    for t in tensors:
        if t.is_float:
            d = np.asarray(new[t.name], dtype=np.float64) - np.asarray(base[t.name], dtype=np.float64)
            out[t.name] = _cast(t, d)
        else:
            a, b = _cast(t, new[t.name]), _cast(t, base[t.name])
            out[t.name] = _exact_int(t, a.astype(object) - b.astype(object))
    return out


def _exact_int(t: TensorSpec, values: object) -> np.ndarray:
    """An object array of Python ints as the integer dtype of ``t``, refusing any value outside it."""
    info = np.iinfo(NUMPY_DTYPES[t.dtype])
    flat = [int(v) for v in np.asarray(values, dtype=object).reshape(-1).tolist()]
    if any(v < info.min or v > info.max for v in flat):
        raise TensorMismatch(f"tensor {t.name!r}: a difference does not fit {t.dtype}")
    return np.array(flat, dtype=NUMPY_DTYPES[t.dtype]).reshape(t.shape)


def apply_delta(base: Mapping[str, np.ndarray], d: Mapping[str, np.ndarray], tensors: Sequence[TensorSpec]) -> Params:
    """``base + d`` per manifest tensor, in the manifest dtype (float64 arithmetic for floats,
    exact for integers)."""
    out: Params = {}
    for t in tensors:
        if t.is_float:
            s = np.asarray(base[t.name], dtype=np.float64) + np.asarray(d[t.name], dtype=np.float64)
        else:
            out[t.name] = _exact_int(t, _cast(t, base[t.name]).astype(object) + _cast(t, d[t.name]).astype(object))
            continue
        out[t.name] = _cast(t, s)
    return out
