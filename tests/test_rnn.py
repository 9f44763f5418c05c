"""RecurrentNet and Seq2Seq: shapes, state carrying, chunking equals whole sequence."""

import pytest
import torch

from rnnzoo.models.rnn import CELLS, RecurrentNet, RNNConfig, Seq2Seq, Seq2SeqConfig


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("bidir", [False, True])
def test_shapes_and_state_layout(cell, bidir):
    torch.manual_seed(0)
    cfg = RNNConfig(
        cell=cell, hidden_size=8, num_layers=2, bidirectional=bidir, input_size=3, output_size=4
    )
    net = RecurrentNet(cfg)
    y, state = net(torch.randn(5, 6, 3))
    assert y.shape == (5, 6, 4)
    assert len(state) == (2 if cell.startswith("lstm") else 1)
    for s in state:
        assert s.shape == (2 * (2 if bidir else 1), 5, 8)  # (L*D, B, H): the ONNX layout


@pytest.mark.parametrize("cell", CELLS)
def test_chunks_carry_state_exactly(cell):
    torch.manual_seed(1)
    net = RecurrentNet(
        RNNConfig(
            cell=cell, hidden_size=6, num_layers=2, vocab_size=11, embed_size=5, output_size=11
        )
    )
    net.eval()
    tokens = torch.randint(0, 11, (2, 13))
    with torch.no_grad():
        y_whole, s_whole = net(tokens)
        state, ys = None, []
        for chunk in (tokens[:, :1], tokens[:, 1:8], tokens[:, 8:]):
            y, state = net(chunk, state)
            ys.append(y)
    torch.testing.assert_close(torch.cat(ys, 1), y_whole, atol=1e-6, rtol=1e-5)
    for a, b in zip(state, s_whole, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_no_head_returns_top_hidden():
    net = RecurrentNet(
        RNNConfig(cell="gru", hidden_size=7, bidirectional=True, input_size=2, output_size=0)
    )
    y, _ = net(torch.randn(1, 3, 2))
    assert y.shape == (1, 3, 14)


def test_unknown_cell_is_rejected_with_the_choices():
    with pytest.raises(ValueError, match="cell must be one of"):
        RNNConfig(cell="transformer", hidden_size=4)


def test_seq2seq_teacher_forcing_matches_stepwise_decode():
    torch.manual_seed(2)
    m = Seq2Seq(
        Seq2SeqConfig(cell="lstm", hidden_size=8, src_vocab_size=12, tgt_vocab_size=9, num_layers=2)
    )
    m.eval()
    src = torch.randint(3, 12, (3, 5))
    with torch.no_grad():
        out = m.greedy_decode(src, bos=1, eos=2, max_len=6)
        tgt_in = torch.cat([torch.ones(3, 1, dtype=torch.long), out[:, :-1]], 1)
        logits = m(src, tgt_in)
    # Teacher forcing on the greedy output reproduces the same argmax at every step.
    assert torch.equal(logits.argmax(-1), out)
    assert out.shape[0] == 3 and 1 <= out.shape[1] <= 6
