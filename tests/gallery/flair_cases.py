"""flair 0.15.1: ``flair.models.LanguageModel``, the character language model behind flair's
contextual string embeddings, built from a ``flair.data.Dictionary`` as flair builds it and
called as ``get_representation`` and its training loop call it: ``model(chars, hidden)``, chars
time-major ``(T, B)``, ``hidden`` a tuple of ``(layers, B, H)`` states (``(h, c)`` for an LSTM,
``(h,)`` for a GRU), returning ``(logits, output, hidden)``. Its forward calls
``flatten_parameters()``; the module pickles itself through ``__getstate__``/``__setstate__``."""

from __future__ import annotations

import torch
from gallery_case import Case

LIB = "flair"
CHARS = "abcdefghijklmnopqrstuvwxyz .,\n"


def _lm(recurrent_type: str = "LSTM", nlayers: int = 1, **kw):
    def build():
        from flair.data import Dictionary
        from flair.models import LanguageModel

        torch.manual_seed(0)
        chars = Dictionary(add_unk=True)
        for c in CHARS:
            chars.add_item(c)
        lm = LanguageModel(
            chars,
            is_forward_lm=True,
            hidden_size=12,
            nlayers=nlayers,
            embedding_size=8,
            recurrent_type=recurrent_type,
            **kw,
        ).eval()
        batch = 2
        hidden = lm.init_hidden(batch)
        ids = torch.randint(0, len(chars), (7, batch))
        return lm, (ids, hidden)

    return build


CASES = [
    Case(LIB, "flair_lm_lstm", _lm()),
    Case(LIB, "flair_lm_lstm_2layer", _lm(nlayers=2)),
    Case(LIB, "flair_lm_gru_projected", _lm("GRU", nout=6)),
]
