"""Tasks: data shapes, determinism, baselines computed correctly, tagging labels, vocabularies."""

from __future__ import annotations

import math

import pytest
import torch

from rnnzoo.errors import InvalidArgument, NotFound
from rnnzoo.models.rnn import RecurrentNet, RNNConfig, Seq2Seq, Seq2SeqConfig
from rnnzoo.models.tasks import TASKS, make_task
from rnnzoo.models.tasks.adding import AddingProblem
from rnnzoo.models.tasks.base import char_vocab, encode_chars
from rnnzoo.models.tasks.charlm import CharLM, sample
from rnnzoo.models.tasks.forecast import SineForecast
from rnnzoo.models.tasks.num2words import BOS, EOS, PAD, NumToWords, is_heldout, number_words
from rnnzoo.models.tasks.pytag import LABELS, PyTag, tag_source


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_registry_builds_every_task_and_rejects_unknown():
    assert set(TASKS) == {"sines", "charlm", "adding", "pytag", "num2words"}
    with pytest.raises(NotFound, match="known tasks: adding, charlm"):
        make_task("nope")
    with pytest.raises(InvalidArgument, match="sines"):
        make_task("sines", no_such_param=1)


def test_forecast_shapes_determinism_and_naive_baseline():
    task = SineForecast(seq_len=40, warmup=5, eval_size=32)
    x, y = task.batch(8, _gen())
    assert x.shape == (8, 40, 1) and y.shape == (8, 40, 1)
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one step
    x2, _ = task.batch(8, _gen())
    assert torch.equal(x, x2)
    assert not torch.equal(x, task.batch(8, _gen(1))[0])
    # A model that outputs its input is exactly the naive last-value forecaster.
    echo = lambda inp, state=None: (inp, state)  # noqa: E731
    ev = task.evaluate(echo)
    assert ev.value == pytest.approx(ev.baseline)
    assert ev.ratio == pytest.approx(1.0)
    s = task.eval_series
    assert ev.baseline == pytest.approx(float(((s[:, 5:-1] - s[:, 6:]) ** 2).mean()), rel=1e-5)
    meta = task.metadata()
    assert meta["kind"] == "forecast"
    assert set(meta["normalization"]) == {"mean", "std"} and meta["normalization"]["std"] > 0
    # Normalised with the recorded statistics: the data is roughly standardised.
    assert abs(float(s.mean())) < 0.3 and 0.7 < float(s.std()) < 1.3


def test_adding_problem_targets_and_trivial_baseline():
    task = AddingProblem(seq_len=50, eval_size=500)
    x, y = task.batch(16, _gen())
    assert x.shape == (16, 50, 2) and y.shape == (16, 1)
    marks = x[..., 1]
    assert torch.all(marks.sum(1) == 2)
    assert torch.all(marks[:, :5].sum(1) == 1)  # one marker in the first tenth
    assert torch.all(marks[:, 25:].sum(1) == 1)  # one in the second half
    assert torch.allclose(y[:, 0], (x[..., 0] * marks).sum(1))
    assert task.trivial == pytest.approx(1.0, abs=0.02)
    # The trivial predictor's MSE is the target variance, 1/6 for a sum of two U(0,1).
    ev = task.evaluate(
        lambda inp, state=None: (torch.full((*inp.shape[:2], 1), task.trivial), state)
    )
    assert ev.value == pytest.approx(ev.baseline) and ev.baseline == pytest.approx(1 / 6, rel=0.15)
    net = RecurrentNet(RNNConfig("gru", 8, **task.model_io()))
    probe = task.probe(net, task.batch(4, _gen()))
    assert probe["grad_early"] > 0 and probe["grad_late"] > 0


def test_tag_source_labels_a_snippet():
    src = 'if x1 >= 0.5:  # hi\n    items = f"a{b}"\n'
    tags = [LABELS[t] for t in tag_source(src)]
    assert len(tags) == len(src)

    def labels_of(fragment: str, start: int = 0) -> set[str]:
        i = src.index(fragment, start)
        return set(tags[i : i + len(fragment)])

    assert labels_of("if") == {"keyword"}
    assert labels_of("x1") == {"name"}
    assert labels_of(">=") == {"op"}
    assert labels_of("0.5") == {"number"}
    assert labels_of("# hi") == {"comment"}
    assert labels_of("items") == {"name"}
    assert labels_of('f"a{b}"') == {"string"}
    assert labels_of("    ") == {"other"}
    assert tags[src.index("\n")] == "other"


def test_pytag_task_splits_files_and_majority_baseline():
    task = PyTag(train_chars=30_000, eval_chars=5_000, seq_len=64)
    x, y = task.batch(4, _gen())
    assert x.shape == y.shape == (4, 64) and x.dtype == y.dtype == torch.long
    assert int(y.max()) < len(LABELS)
    assert torch.equal(x, task.batch(4, _gen())[0])
    meta = task.metadata()
    assert meta["labels"] == LABELS and meta["vocab"][0] == "\ufffd"
    ev = task.evaluate(
        lambda inp, state=None: (
            torch.nn.functional.one_hot(torch.full_like(inp, task.majority), len(LABELS)).float(),
            state,
        )
    )
    assert ev.value == pytest.approx(ev.baseline)  # always-majority is the baseline


def test_charlm_bpc_baseline_and_sampling():
    task = CharLM(corpus_chars=1_000_000, seq_len=32, eval_chars=2000, eval_rows=4)
    assert task.corpus["chars"] >= 1_000_000 and len(task.corpus["sha256"]) == 64
    x, y = task.batch(3, _gen())
    assert x.shape == y.shape == (3, 32)
    assert torch.equal(x[:, 1:], y[:, :-1])
    # A model that predicts the unigram distribution at every step scores the baseline.
    logp = task.unigram_logp.float()
    ev = task.evaluate(lambda inp, state=None: (logp.expand(*inp.shape, -1), state))
    assert ev.value == pytest.approx(ev.baseline, rel=1e-4)
    assert 3.0 < ev.baseline < 6.0  # bits/char of Python source characters
    torch.manual_seed(0)
    net = RecurrentNet(RNNConfig("gru", 16, **task.model_io())).eval()
    a = sample(net, task.vocab, "def ", 20, temperature=0.8, seed=3)
    assert len(a) == 20 and a == sample(net, task.vocab, "def ", 20, temperature=0.8, seed=3)
    assert task.sample(net, "def ", 20, temperature=0.8, seed=3) == a
    assert task.metadata()["io"] == {"vocab_size": len(task.vocab), "output_size": len(task.vocab)}
    greedy = sample(net, task.vocab, "def ", 20, temperature=0)
    assert greedy == sample(net, task.vocab, "def ", 20, temperature=0, seed=9)
    with pytest.raises(ValueError, match="temperature"):
        sample(net, task.vocab, "x", 1, temperature=-1)


def test_char_vocab_and_unknowns():
    vocab = char_vocab("abcabcz", min_count=2)
    assert vocab == ["\ufffd", "a", "b", "c"]
    assert encode_chars("abz", vocab).tolist() == [1, 2, 0]


@pytest.mark.parametrize(
    ("n", "words"),
    [
        (0, "zero"),
        (7, "seven"),
        (15, "fifteen"),
        (40, "forty"),
        (42, "forty-two"),
        (100, "one hundred"),
        (101, "one hundred one"),
        (1000, "one thousand"),
        (90210, "ninety thousand two hundred ten"),
        (999999, "nine hundred ninety-nine thousand nine hundred ninety-nine"),
    ],
)
def test_number_words(n, words):
    assert " ".join(number_words(n)) == words


def test_num2words_batches_split_and_metadata():
    task = NumToWords(eval_per_length=10)
    src, tgt_in, tgt = task.batch(16, _gen())
    assert src.shape[0] == tgt.shape[0] == 16 and tgt_in.shape == tgt.shape
    assert torch.all(tgt_in[:, 0] == BOS)
    assert torch.equal(tgt_in[:, 1:], tgt[:, :-1])
    assert torch.all((tgt == EOS).sum(1) == 1)  # one eos per target, then padding
    for row, t in zip(src.tolist(), tgt.tolist(), strict=True):
        n = int("".join(task.src_vocab[i] for i in row))
        assert task.decode_target(t) == " ".join(number_words(n))
        assert len(row) <= 2 or not is_heldout(n)  # never trains on a held-out number
    assert all(is_heldout(n) for nums in task.eval_numbers[2:] for n in nums)
    meta = task.metadata()
    assert meta["special_tokens"] == {"pad": PAD, "bos": BOS, "eos": EOS}
    assert meta["vocab"][:3] == meta["target_vocab"][:3] == ["<pad>", "<bos>", "<eos>"]
    assert sum(is_heldout(n) for n in range(10_000)) == pytest.approx(1000, abs=50)
    torch.manual_seed(0)
    model = Seq2Seq(Seq2SeqConfig("gru", 16, **task.model_io())).eval()
    ev = task.evaluate(model)
    assert 0.0 <= ev.value <= 1.0 and ev.baseline == pytest.approx(1 / ev.extra["heldout_numbers"])
    assert math.isfinite(task.loss(model, (src, tgt_in, tgt)).item())
