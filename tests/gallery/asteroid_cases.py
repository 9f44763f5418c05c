"""asteroid 0.7.0: ``asteroid.masknn.recurrent.SingleRNN`` (calls ``flatten_parameters()`` in
every forward, returns only the output) and ``DPRNNBlock``, the dual-path block of DPRNN-TasNet:
a bidirectional intra-chunk RNN over ``(B*L, K, N)`` and an inter-chunk RNN over
``(B*K, L, N)``, i.e. time folded into the batch, each followed by a Linear and a norm."""

from __future__ import annotations

import torch
from gallery_case import EXPORTS, REFUSED, Case

LIB = "asteroid"


def _single(rnn_type: str, **kw):
    def build():
        from asteroid.masknn.recurrent import SingleRNN

        torch.manual_seed(0)
        return SingleRNN(rnn_type, 6, 8, **kw).eval(), (torch.randn(2, 5, 6),)

    return build


def _dprnn_block(**kw):
    def build():
        from asteroid.masknn.recurrent import DPRNNBlock

        torch.manual_seed(0)
        block = DPRNNBlock(in_chan=6, hid_size=8, **kw).eval()
        # (batch, channels, chunk size K, number of chunks L): L is the time axis
        return block, (torch.randn(2, 6, 4, 5),)

    return build


def _lstm_masker():
    from asteroid.masknn.recurrent import LSTMMasker

    torch.manual_seed(0)
    masker = LSTMMasker(
        in_chan=6, n_src=2, rnn_type="lstm", n_layers=2, hid_size=8, bidirectional=False
    ).eval()
    return masker, (torch.randn(2, 6, 7),)  # (batch, freq, time)


CASES = [
    Case(LIB, "ast_single_lstm", _single("LSTM")),
    Case(LIB, "ast_single_gru_2layer", _single("GRU", n_layers=2)),
    Case(LIB, "ast_single_rnn", _single("RNN")),
    Case(
        LIB,
        "ast_single_lstm_bidirectional",
        _single("LSTM", bidirectional=True),
        expect=EXPORTS,
        why="bidirectional",
    ),
    Case(
        LIB,
        "ast_dprnn_block_bidirectional_gln",
        _dprnn_block(norm_type="gLN", bidirectional=True, rnn_type="LSTM"),
        # asteroid's z_norm (gLN) reads its reduction dims from a tensor (.item() per dim): a
        # Python int taken from a value cannot be traced with a symbolic size
        expect=REFUSED,
        why="read from a tensor's value",
        kwargs={"axes": {"x": {"batch": 0, "time": 3}}},
    ),
    Case(
        LIB,
        "ast_dprnn_block_causal_cln",
        _dprnn_block(norm_type="cLN", bidirectional=False, rnn_type="GRU"),
        expect=EXPORTS,
        kwargs={"axes": {"x": {"batch": 0, "time": 3}}},
    ),
    Case(
        LIB,
        "ast_lstm_masker_causal",
        _lstm_masker,
        expect=EXPORTS,  # CumLN normalises over all steps so far: not a recurrent state
    ),
]
