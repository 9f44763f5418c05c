"""Packed sequences (``pack_padded_sequence`` -> layer -> ``pad_packed_sequence``) at export.

A ``PackedSequence`` holds ``sum(lengths)`` rows: its size depends on the lengths' values,
which torch.export cannot trace. ONNX recurrent nodes take the padded ``(T, B, F)`` input and
per-sequence lengths instead (``sequence_lens``): steps past a sequence's length produce zeros
and its final state is the state at its own last step, which is what PyTorch computes from
the packed sequence. So, while the flat module is being traced, ``fake_packing`` makes
``pack_padded_sequence`` (through ``torch._VF._pack_padded_sequence``, which it calls
whatever name the user imported it under) return a ``PackedSequence`` whose ``data`` is the
padded input, time-major, and whose ``batch_sizes`` are the lengths; the layer emits its
native nodes with those lengths, and ``pad_packed_sequence`` (``_VF._pad_packed_sequence``)
turns it back into a padded tensor, with ``padding_value`` past each length. The sorting and
unsorting that ``pack_padded_sequence(enforce_sorted=False)`` does around them runs as written.

Outputs are padded to the input's time length; PyTorch pads to the longest sequence of the
batch, the same whenever one sequence fills the time axis (verify samples lengths so).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

_VF = torch._VF


def _pack(input: torch.Tensor, lengths: torch.Tensor, batch_first: bool):
    data = input.transpose(0, 1) if batch_first else input  # (T, B, ...)
    return data, lengths.to(torch.int64)


def _pad(
    data: torch.Tensor,
    batch_sizes: torch.Tensor,
    batch_first: bool,
    padding_value: float | complex,
    total_length: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    T = data.shape[0]
    steps = torch.arange(T, device=batch_sizes.device).unsqueeze(1)  # (T, 1)
    keep = (steps < batch_sizes.unsqueeze(0)).reshape(T, -1, *([1] * (data.dim() - 2)))
    out = torch.where(keep, data, torch.full_like(data, padding_value))
    return (out.transpose(0, 1) if batch_first else out), batch_sizes


@contextlib.contextmanager
def fake_packing() -> Iterator[None]:
    """Packed sequences as (padded data, lengths) for the duration (see the module doc)."""
    saved = {k: _VF.__dict__.get(k) for k in ("_pack_padded_sequence", "_pad_packed_sequence")}
    setattr(_VF, "_pack_padded_sequence", _pack)  # noqa: B010 (a module attribute, typed)
    setattr(_VF, "_pad_packed_sequence", _pad)  # noqa: B010
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                _VF.__dict__.pop(k, None)
            else:
                setattr(_VF, k, v)


def unpack(x: nn.utils.rnn.PackedSequence, hx, lstm: bool):
    """(time-major padded data, lengths, hx in the packed batch order) of a fake-packed input."""
    if hx is not None and x.sorted_indices is not None:
        parts = hx if lstm else (hx,)
        parts = tuple(h.index_select(1, x.sorted_indices) for h in parts)
        hx = parts if lstm else parts[0]
    return x.data, x.batch_sizes, hx


def repack(x: nn.utils.rnn.PackedSequence, out: torch.Tensor, hn, lstm: bool):
    """The layer's result for a fake-packed input: a PackedSequence and the final states in
    the caller's batch order, as ``nn.LSTM`` returns them."""
    if x.unsorted_indices is not None:
        parts = hn if lstm else (hn,)
        parts = tuple(h.index_select(1, x.unsorted_indices) for h in parts)
        hn = parts if lstm else parts[0]
    packed = nn.utils.rnn.PackedSequence(out, x.batch_sizes, x.sorted_indices, x.unsorted_indices)
    return packed, hn


@contextlib.contextmanager
def recording_packs(padded: dict[int, int]) -> Iterator[None]:
    """Eager packing as usual, noting each packed data's padded time length (by id)."""
    original = _VF._pack_padded_sequence

    def pack(input: torch.Tensor, lengths: torch.Tensor, batch_first: bool):
        data, batch_sizes = original(input, lengths, batch_first)
        padded[id(data)] = int(input.shape[1 if batch_first else 0])
        return data, batch_sizes

    setattr(_VF, "_pack_padded_sequence", pack)  # noqa: B010
    try:
        yield
    finally:
        _VF.__dict__.pop("_pack_padded_sequence", None)
