"""neuralforecast 3.3.0: the ``LSTM``/``GRU``/``RNN`` forecasting models (lightning modules)
built as users build them (``LSTM(h=..., input_size=...)``), and called as the library's own
training and prediction steps call them: ``model(windows_batch)``, a dict of the target
window and the exogenous tensors. ``recurrent=True`` runs the layer over the window and
keeps its last ``h`` steps (an ``nn.LSTM`` with ``proj_size`` there); the direct mode decodes
the last ``h`` steps with an MLP, up-sampling over time when ``h > input_size``."""

from __future__ import annotations

import torch
from gallery_case import EXPORTS, REFUSED, Case
from torch import nn

LIB = "neuralforecast"


class _Windows(nn.Module):
    """What BaseModel's training/prediction step hands the model: a window batch dict."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, insample_y):
        batch = {"insample_y": insample_y, "futr_exog": None, "hist_exog": None, "stat_exog": None}
        return self.model(batch)


def _model(kind: str, input_size: int, **kw):
    def build():
        import logging

        import neuralforecast.models as models

        logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)
        torch.manual_seed(0)
        net = getattr(models, kind)(input_size=input_size, encoder_hidden_size=8, **kw)
        return _Windows(net).eval(), (torch.randn(2, input_size, 1),)

    return build


CASES = [
    Case(
        LIB,
        "nf_lstm_recurrent_proj",
        # recurrent mode projects the LSTM's output inside the layer (proj_size=1)
        _model("LSTM", 12, h=4, recurrent=True, encoder_n_layers=2),
        expect=REFUSED,
        why="proj_size",
    ),
    Case(
        LIB,
        "nf_gru_recurrent_last_steps",
        _model("GRU", 12, h=4, recurrent=True),
        expect=EXPORTS,
    ),
    Case(
        LIB,
        "nf_lstm_direct_last_steps",
        _model("LSTM", 12, h=4, encoder_n_layers=2, decoder_hidden_size=8),
        expect=EXPORTS,
    ),
    Case(
        LIB,
        "nf_rnn_direct_upsampled",
        # h > input_size: nn.Linear(input_size, h) over the time axis fixes the length
        _model("RNN", 6, h=10, decoder_hidden_size=8),
        expect=REFUSED,
        why="must run at other sizes than the example's",
    ),
]
