"""KServe v2 tensors <-> numpy: datatypes, raw contents, BYTES, parameters.

Inputs come as ``raw_input_contents`` (one little-endian, C-order buffer per input, what
tritonclient sends) or in the typed ``contents`` fields; outputs always go back as
``raw_output_contents`` (tritonclient reads only those, then ``bytes_contents``). BYTES
elements are a 4-byte little-endian length, then the bytes (Triton's serialization); they
carry text (UTF-8). Every malformed tensor is InvalidArgument naming the input.
"""

from __future__ import annotations

import math
import struct

import numpy as np

from rnnzoo.errors import InvalidArgument
from rnnzoo.proto.tensors import MAX_ELEMENTS, MAX_RANK
from rnnzoo.server.runtime.redact import clip

# KServe datatype -> little-endian numpy dtype
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
# contract dtype name -> KServe datatype
OF_DTYPE = {
    "float32": "FP32",
    "float64": "FP64",
    "float16": "FP16",
    "int64": "INT64",
    "int32": "INT32",
    "bool": "BOOL",
}
_BY_NUMPY = {dt.newbyteorder("="): name for name, dt in DATATYPES.items()}
# typed contents field per datatype (when no raw contents are sent)
_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}
MAX_BYTES_ELEMENTS = 1 << 16  # strings in one BYTES tensor


def _shape(t, what: str) -> tuple[int, ...]:
    shape = tuple(t.shape)
    if len(shape) > MAX_RANK or (shape and min(shape) < 0):
        raise InvalidArgument(
            f"{what}: shape {list(shape)[: MAX_RANK + 1]} is invalid (dims must be >= 0, "
            f"rank <= {MAX_RANK})"
        )
    if math.prod(d or 1 for d in shape) > MAX_ELEMENTS:
        raise InvalidArgument(f"{what}: shape {list(shape)} is absurdly large")
    return shape


def decode_inputs(req) -> dict[str, np.ndarray | list[str]]:
    """A ModelInferRequest's inputs: name -> array, or (BYTES) name -> list of strings with
    the shape's element count (row-major)."""
    raw = req.raw_input_contents
    if raw and len(raw) != len(req.inputs):
        raise InvalidArgument(
            f"{len(raw)} raw_input_contents for {len(req.inputs)} inputs; send one buffer per "
            "input, in the order of inputs (or none, and use contents)"
        )
    out: dict[str, np.ndarray | list[str]] = {}
    for i, t in enumerate(req.inputs):
        what = f"input {clip(t.name)!r}"
        if not t.name:
            raise InvalidArgument(f"input #{i} has no name; name every input")
        if t.name in out:
            raise InvalidArgument(f"{what} is given twice")
        shape = _shape(t, what)
        n = math.prod(shape)
        if t.datatype == "BYTES":
            items = _split_bytes(raw[i], what) if raw else list(t.contents.bytes_contents)
            if len(items) != n:
                raise InvalidArgument(
                    f"{what}: {len(items)} BYTES elements, shape {list(shape)} needs {n}"
                )
            try:
                out[t.name] = [b.decode("utf-8") for b in items]
            except UnicodeDecodeError as exc:
                raise InvalidArgument(f"{what}: BYTES element is not UTF-8 text ({exc})") from None
            continue
        dt = DATATYPES.get(t.datatype)
        if dt is None:
            raise InvalidArgument(
                f"{what}: datatype {clip(t.datatype)!r} is not supported; use one of "
                f"{sorted([*DATATYPES, 'BYTES'])}"
            )
        if raw:
            data = raw[i]
            if len(data) != n * dt.itemsize:
                raise InvalidArgument(
                    f"{what}: {len(data)} bytes of raw_input_contents, but shape "
                    f"{list(shape)} of {t.datatype} needs {n * dt.itemsize} (little-endian, "
                    "C order)"
                )
            a = np.frombuffer(data, dt).reshape(shape)
            if dt.kind == "b" and a.size and a.view(np.uint8).max() > 1:
                raise InvalidArgument(f"{what}: BOOL values must be bytes 0 or 1")
            out[t.name] = a.astype(dt.newbyteorder("="), copy=False)
            continue
        field = _FIELD.get(t.datatype)
        values = getattr(t.contents, field) if field else ()
        if len(values) != n:
            raise InvalidArgument(
                f"{what}: {len(values)} values in contents.{field or '?'}, shape "
                f"{list(shape)} needs {n}; or send raw_input_contents"
            )
        try:
            out[t.name] = np.asarray(values, dtype=dt.newbyteorder("=")).reshape(shape)
        except (OverflowError, ValueError) as exc:
            raise InvalidArgument(f"{what}: values do not fit {t.datatype} ({exc})") from None
    return out


def _split_bytes(data: bytes, what: str) -> list[bytes]:
    items: list[bytes] = []
    pos = 0
    while pos < len(data):
        if pos + 4 > len(data) or len(items) >= MAX_BYTES_ELEMENTS:
            raise InvalidArgument(
                f"{what}: BYTES raw contents are malformed (each element is a 4-byte "
                "little-endian length, then that many bytes)"
            )
        (size,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if pos + size > len(data):
            raise InvalidArgument(f"{what}: a BYTES element of {size} bytes runs past the data")
        items.append(data[pos : pos + size])
        pos += size
    return items


def datatype_of(array: np.ndarray) -> str:
    name = _BY_NUMPY.get(array.dtype.newbyteorder("="))
    if name is None:
        raise InvalidArgument(f"cannot send an output of dtype {array.dtype}")
    return name


def fill_outputs(resp, outputs: dict[str, np.ndarray], wanted: list[str] | None = None) -> None:
    """Outputs into ``resp.outputs`` + ``raw_output_contents`` (in the same order)."""
    for name, array in outputs.items():
        if wanted and name not in wanted:
            continue
        a = np.asarray(array)
        dt = datatype_of(a)
        t = resp.outputs.add()
        t.name, t.datatype = name, dt
        t.shape.extend(a.shape)
        resp.raw_output_contents.append(np.ascontiguousarray(a, DATATYPES[dt]).tobytes())


def param_value(p):
    """An InferParameter's value (None when unset)."""
    which = p.WhichOneof("parameter_choice")
    return None if which is None else getattr(p, which)
