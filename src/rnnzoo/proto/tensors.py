"""numpy <-> ``rnnzoo.v1.Tensor``: raw little-endian bytes with a shape and a dtype name.

Shared by the server and the client. Raw bytes, not ``repeated float``: a chunk of a few
hundred floats costs one memcpy instead of a per-value varint/fixed32 walk, and float64 or
int64 keep their exact values.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping

import numpy as np

from rnnzoo.errors import InvalidArgument
from rnnzoo.proto.v1 import rnnzoo_pb2 as pb

# dtype name on the wire -> little-endian numpy dtype
DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
    "float16": np.dtype("<f2"),
    "int64": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
    "bool": np.dtype("?"),
}
# Per-message lookups, precomputed: ``dtype.name`` is a slow Python-level property in numpy.
_NAMES: dict[np.dtype, str] = {dt.newbyteorder("="): n for n, dt in DTYPES.items()}
_NATIVE: dict[str, np.dtype] = {n: dt.newbyteorder("=") for n, dt in DTYPES.items()}
# Wire dtypes whose bytes are already in this machine's order: no conversion needed.
_AS_IS: frozenset[str] = frozenset(n for n, dt in DTYPES.items() if dt.isnative)
_LITTLE = sys.byteorder == "little"
MAX_RANK = 16  # far above any recurrent model's tensors; bounds the shape walk
# numpy refuses (ValueError) a shape whose dims multiply past its index range, even when a
# zero dim makes the array empty: e.g. [0, 2**62]. Checked first, with Python ints.
MAX_ELEMENTS = 1 << 40


def to_tensor(array: object) -> pb.Tensor:
    """A numpy array (or anything ``np.asarray`` takes) -> Tensor."""
    t = pb.Tensor()
    _fill(t, array)
    return t


def _fill(t: pb.Tensor, array: object) -> None:
    """Write ``array`` into the (empty) Tensor ``t``, e.g. an entry of a message's map field:
    filling in place skips building a Tensor and copying it into the map."""
    a = array if type(array) is np.ndarray else np.asarray(array)
    name = _NAMES.get(a.dtype)
    if name is not None and _LITTLE:  # the common case: tobytes() is little-endian C order
        data = a.tobytes()
    else:
        name = name or _NAMES.get(a.dtype.newbyteorder("="))
        if name is None:
            raise InvalidArgument(
                f"cannot send an array of dtype {a.dtype}; supported dtypes: {sorted(DTYPES)}"
            )
        data = np.ascontiguousarray(a, dtype=DTYPES[name]).tobytes()
    t.dtype = name
    t.shape.extend(a.shape)
    t.data = data


def from_tensor(t: pb.Tensor, *, name: str = "tensor") -> np.ndarray:
    """Tensor -> numpy array (native byte order). Bad dtype/shape/bytes -> InvalidArgument."""
    return _decode(t, name, None)


def _decode(t: pb.Tensor, what: str, key: str | None) -> np.ndarray:
    """``from_tensor``; the error prefix is ``what`` or ``what 'key'``, built only on error
    (this runs once per tensor per streamed message)."""
    dtype = t.dtype
    dt = DTYPES.get(dtype)
    if dt is None:
        raise InvalidArgument(
            f"{_label(what, key)}: unknown dtype {clip(dtype)!r}; use one of {sorted(DTYPES)}"
        )
    shape = tuple(t.shape[:])  # a slice first: 0.46 µs vs 0.98 for tuple() of the field
    if len(shape) > MAX_RANK or (shape and min(shape) < 0):
        raise InvalidArgument(
            f"{_label(what, key)}: shape {list(shape)[: MAX_RANK + 1]} is invalid (dims must "
            f"be >= 0, rank <= {MAX_RANK})"
        )
    data = t.data  # one read: each access of a bytes field builds a new bytes object
    want = math.prod(shape) * dt.itemsize
    if len(data) != want:
        raise InvalidArgument(
            f"{_label(what, key)}: {len(data)} bytes of data, but shape {list(shape)} of "
            f"{dtype} needs {want} ({math.prod(shape)} values x {dt.itemsize} bytes, "
            "little-endian, C order)"
        )
    # A non-empty shape is bounded by the bytes that came with it; an empty one is not.
    if not want and math.prod(d or 1 for d in shape) > MAX_ELEMENTS:
        raise InvalidArgument(
            f"{_label(what, key)}: shape {list(shape)} is absurdly large (its non-zero dims "
            f"multiply past {MAX_ELEMENTS}); send the real shape of the data"
        )
    a = np.ndarray(shape, dt, data)  # a read-only view of the bytes, size checked above
    if dt.kind == "b" and a.size and a.view(np.uint8).max() > 1:
        raise InvalidArgument(f"{_label(what, key)}: bool values must be bytes 0 or 1")
    return a if dtype in _AS_IS else a.astype(_NATIVE[dtype], copy=False)


def _label(what: str, key: str | None) -> str:
    return what if key is None else f"{what} {clip(key)!r}"


def clip(text: str, limit: int = 64) -> str:
    """A client string as echoed in an error message: at most ``limit`` characters."""
    return text if len(text) <= limit else text[:limit] + "…"


def to_tensors(arrays: Mapping[str, object]) -> dict[str, pb.Tensor]:
    return {k: to_tensor(v) for k, v in arrays.items()}


def fill_tensors(field, arrays: Mapping[str, object]) -> None:
    """Write ``arrays`` into a message's ``map<string, Tensor>`` field, in place."""
    for k, v in arrays.items():
        _fill(field[k], v)


def from_tensors(tensors: Mapping[str, pb.Tensor], *, what: str = "input") -> dict[str, np.ndarray]:
    # keys, then lookups: a message map's .items() is collections.abc's Python-level view
    return {k: _decode(tensors[k], what, k) for k in tensors}
