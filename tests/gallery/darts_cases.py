"""darts 0.48.1: the torch modules inside ``RNNModel`` (``_RNNModule``) and ``BlockRNNModel``
(``_BlockRNNModule``), created by the models' own ``_create_model`` from a training sample's
shapes, as ``fit`` creates them. darts calls them with a ``PLModuleInput`` (its batch of
tensors, plus the loop stage and the carried ``state``); the adapters below build one the way
darts' training and prediction loops do, since a graph takes tensors."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from gallery_case import EXPORTS, REFUSED, STREAMS, Case
from torch import nn

LIB = "darts"


def _inner(model_cls, sample: dict, **kw):
    torch.manual_seed(0)
    model = model_cls(random_state=0, **kw)
    return model._create_model(SimpleNamespace(**sample)).eval()


class _Train(nn.Module):
    """RNNModel's training/validation call: a prediction for every step of the window."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, past_target):
        from darts.models.forecasting.pl_forecasting_module import ModuleStage, PLModuleInput

        x = PLModuleInput(past_target=past_target, stage=ModuleStage.TRAIN)
        return self.module(x).prediction


class _TrainCovariates(nn.Module):
    """The same with future covariates (RNNModel is a dual-covariates model)."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, past_target, future_covariates):
        from darts.models.forecasting.pl_forecasting_module import ModuleStage, PLModuleInput

        x = PLModuleInput(
            past_target=past_target, future_covariates=future_covariates, stage=ModuleStage.TRAIN
        )
        return self.module(x).prediction


class _PredictStep(nn.Module):
    """RNNModel's autoregressive prediction loop after the first call: the last value and
    the carried state in, the next prediction and state out."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, past_target, h0, c0):
        from darts.models.forecasting.pl_forecasting_module import ModuleStage, PLModuleInput

        x = PLModuleInput(past_target=past_target, state=(h0, c0), stage=ModuleStage.PREDICT)
        out = self.module(x)
        h, c = out.state
        return out.prediction, h, c


class _Block(nn.Module):
    """BlockRNNModel's call: an input window in, an output-chunk-length block out."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, past_target):
        from darts.models.forecasting.pl_forecasting_module import ModuleStage, PLModuleInput

        x = PLModuleInput(past_target=past_target, stage=ModuleStage.PREDICT)
        return self.module(x).prediction


def _rnn(kind: str, layers: int = 1, covariates: int = 0):
    def build():
        from darts.models import RNNModel

        sample = {
            "past_target": torch.zeros(24, 1),
            "future_covariates": torch.zeros(24, covariates) if covariates else None,
        }
        inner = _inner(
            RNNModel,
            sample,
            input_chunk_length=12,
            model=kind,
            hidden_dim=10,
            n_rnn_layers=layers,
            training_length=24,
        )
        if covariates:
            return _TrainCovariates(inner).eval(), (torch.randn(2, 9, 1), torch.randn(2, 9, 2))
        return _Train(inner).eval(), (torch.randn(2, 9, 1),)

    return build


def _predict_step():
    from darts.models import RNNModel

    inner = _inner(
        RNNModel,
        {"past_target": torch.zeros(24, 1), "future_covariates": None},
        input_chunk_length=12,
        model="LSTM",
        hidden_dim=10,
        n_rnn_layers=2,
        training_length=24,
    )
    h = torch.randn(2, 2, 10)
    return _PredictStep(inner).eval(), (torch.randn(2, 4, 1), h, h.clone())


def _block(kind: str, out_len: int, in_len: int = 12, fc=None):
    def build():
        from darts.models import BlockRNNModel

        sample = {
            "past_target": torch.zeros(in_len, 1),
            "past_covariates": None,
            "future_covariates": None,
            "static_covariates": None,
        }
        inner = _inner(
            BlockRNNModel,
            sample,
            input_chunk_length=in_len,
            output_chunk_length=out_len,
            model=kind,
            hidden_dim=10,
            n_rnn_layers=2,
            hidden_fc_sizes=fc,
        )
        return _Block(inner).eval(), (torch.randn(2, in_len, 1),)

    return build


CASES = [
    Case(LIB, "darts_rnn_lstm", _rnn("LSTM")),
    Case(LIB, "darts_rnn_gru_2layer", _rnn("GRU", layers=2)),
    Case(LIB, "darts_rnn_vanilla", _rnn("RNN")),
    Case(
        LIB,
        "darts_rnn_lstm_future_covariates",
        _rnn("LSTM", covariates=2),
    ),
    Case(
        LIB,
        "darts_rnn_predict_step",
        _predict_step,
        expect=STREAMS,
        # the layer reads only past_target[:, -1:]: the input has no time axis, the module is
        # one step of darts' prediction loop (a one-step graph, stepped with its state)
        kwargs={"axes": {"past_target": {"batch": 0, "time": None}}},
    ),
    Case(
        LIB,
        "darts_block_lstm_last_steps",
        _block("LSTM", 4),
        expect=EXPORTS,
    ),
    Case(
        LIB,
        "darts_block_gru_fc",
        _block("GRU", 3, fc=[8]),
        expect=EXPORTS,
    ),
    Case(
        LIB,
        "darts_block_rnn_upsampled",
        # output_chunk_length > input_chunk_length: a Linear over the time axis fixes T
        _block("RNN", 16, in_len=6),
        expect=REFUSED,
        why="must run at other sizes than the example's",
    ),
]
