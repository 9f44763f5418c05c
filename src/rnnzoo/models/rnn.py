"""The recurrent model family: one config, one module, every cell.

``RecurrentNet`` maps ``(x, state) -> (y, state)`` for tanh/ReLU RNNs, GRUs and LSTMs (native
or hand-written), any depth, uni- or bidirectional, with a per-step linear head. The state
is always explicit and in the ONNX layout ``(layers*directions, B, H)``, so the same module
serves whole sequences, chunks and single steps, and exports one-to-one (see docs/design.md).

``Seq2Seq`` is an encoder-decoder of two ``RecurrentNet``s: the encoder's final state is the
decoder's initial state.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from rnnzoo.models.cells import ScratchRNN

CELLS = ("rnn_tanh", "rnn_relu", "gru", "lstm", "gru_scratch", "lstm_scratch")

State = tuple[torch.Tensor, ...]  # (h,) or (h, c), each (L*D, B, H)


@dataclass
class RNNConfig:
    cell: str
    hidden_size: int
    num_layers: int = 1
    bidirectional: bool = False
    input_size: int = 1  # features per step; ignored when vocab_size is set
    vocab_size: int | None = None  # token ids in -> an embedding of embed_size
    embed_size: int = 32
    output_size: int = 1  # 0: no head, y is the top layer's hidden states
    dropout: float = 0.0  # between stacked layers, training only

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {list(CELLS)}, got {self.cell!r}")
        if self.hidden_size < 1 or self.num_layers < 1:
            raise ValueError("hidden_size and num_layers must be >= 1")

    @property
    def is_lstm(self) -> bool:
        return self.cell.startswith("lstm")

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def state_names(self) -> tuple[str, ...]:
        return ("h", "c") if self.is_lstm else ("h",)

    def to_dict(self) -> dict:
        return asdict(self)


def make_recurrent_core(cfg: RNNConfig, input_size: int) -> nn.Module:
    """The nn.RNN/nn.GRU/nn.LSTM (or its hand-written twin) that ``cfg`` names."""
    common: dict[str, Any] = dict(
        input_size=input_size,
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_layers,
        bidirectional=cfg.bidirectional,
        dropout=cfg.dropout if cfg.num_layers > 1 else 0.0,
    )
    if cfg.cell in ("rnn_tanh", "rnn_relu"):
        return nn.RNN(nonlinearity=cfg.cell.removeprefix("rnn_"), batch_first=True, **common)
    if cfg.cell == "gru":
        return nn.GRU(batch_first=True, **common)
    if cfg.cell == "lstm":
        return nn.LSTM(batch_first=True, **common)
    return ScratchRNN(cfg.cell.removesuffix("_scratch"), **common)


class RecurrentNet(nn.Module):
    def __init__(self, cfg: RNNConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed: nn.Embedding | None
        if cfg.vocab_size is not None:
            self.embed = nn.Embedding(cfg.vocab_size, cfg.embed_size)
            core_in = cfg.embed_size
        else:
            self.embed = None
            core_in = cfg.input_size
        self.rnn = make_recurrent_core(cfg, core_in)
        top = cfg.hidden_size * cfg.num_directions
        self.head = nn.Linear(top, cfg.output_size) if cfg.output_size > 0 else None

    def initial_state(self, batch_size: int, device=None) -> State:
        c = self.cfg
        shape = (c.num_layers * c.num_directions, batch_size, c.hidden_size)
        return tuple(torch.zeros(shape, device=device) for _ in c.state_names)

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """x: (B, T, F) float or (B, T) int64 token ids -> y: (B, T, O), state."""
        if self.embed is not None:
            assert x.dim() == 2, f"token input must be (B, T), got {tuple(x.shape)}"
            x = self.embed(x)  # (B, T, E)
        assert x.dim() == 3, f"input must be (B, T, F), got {tuple(x.shape)}"
        if state is None:
            state = self.initial_state(x.shape[0], x.device)
        hx = state if self.cfg.is_lstm else state[0]
        out, hn = self.rnn(x, hx)  # out: (B, T, D*H)
        new_state = tuple(hn) if self.cfg.is_lstm else (hn,)
        y = self.head(out) if self.head is not None else out  # (B, T, O)
        return y, new_state

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


@dataclass
class Seq2SeqConfig:
    cell: str  # "gru" | "lstm" | "rnn_tanh" | ...; unidirectional so both halves stream
    hidden_size: int
    src_vocab_size: int
    tgt_vocab_size: int
    num_layers: int = 1
    embed_size: int = 32

    def encoder_config(self) -> RNNConfig:
        return RNNConfig(
            cell=self.cell,
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
            vocab_size=self.src_vocab_size,
            embed_size=self.embed_size,
            output_size=0,
        )

    def decoder_config(self) -> RNNConfig:
        return RNNConfig(
            cell=self.cell,
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
            vocab_size=self.tgt_vocab_size,
            embed_size=self.embed_size,
            output_size=self.tgt_vocab_size,
        )

    def to_dict(self) -> dict:
        return asdict(self)


class Seq2Seq(nn.Module):
    """Encoder-decoder without attention: the encoder's final state seeds the decoder."""

    def __init__(self, cfg: Seq2SeqConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = RecurrentNet(cfg.encoder_config())
        self.decoder = RecurrentNet(cfg.decoder_config())

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """Teacher forcing. src: (B, S), tgt_in: (B, T) starting with bos -> logits (B, T, V)."""
        _, state = self.encoder(src)
        logits, _ = self.decoder(tgt_in, state)
        return logits

    @torch.no_grad()
    def greedy_decode(self, src: torch.Tensor, bos: int, eos: int, max_len: int) -> torch.Tensor:
        """src: (B, S) -> (B, <=max_len) token ids, eos included where produced."""
        _, state = self.encoder(src)
        tok = torch.full((src.shape[0], 1), bos, dtype=torch.long, device=src.device)
        done = torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
        out = []
        for _ in range(max_len):
            logits, state = self.decoder(tok, state)  # (B, 1, V)
            tok = logits.argmax(-1)  # (B, 1)
            out.append(tok)
            done |= tok[:, 0] == eos
            if bool(done.all()):
                break
        return torch.cat(out, dim=1)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
