"""Generation: sampling helpers, LM and seq2seq decoding against a numpy reference, text I/O."""

import numpy as np
import pytest
from onnx_fixtures import CHARS, build_zoo, reference

from rnnzoo.errors import FailedPrecondition, InvalidArgument
from rnnzoo.server.runtime import ModelRepository, Runtime, RuntimeOptions
from rnnzoo.server.runtime.generate import never_sampled, sample_token

TARGET = ["<pad>", "<bos>", "<eos>", *list("abcd")]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    d = tmp_path_factory.mktemp("zoo")
    refs = build_zoo(d)
    return ModelRepository.from_dir(d), refs


@pytest.fixture
async def rt(zoo):
    runtime = Runtime(zoo[0], RuntimeOptions())
    await runtime.start()
    yield runtime
    await runtime.stop()


async def collect(agen) -> list[str]:
    return [piece async for piece in agen]


def test_sample_token_greedy_top_k_and_seed():
    logits = np.array([0.1, 3.0, 2.5, -1.0, 0.0])
    rng = np.random.default_rng(0)
    assert sample_token(logits, 0.0, 0, rng) == 1
    assert sample_token(logits, 1.0, 1, rng) == 1  # top-1 is greedy at any temperature
    draws = {sample_token(logits, 5.0, 2, rng) for _ in range(200)}
    assert draws == {1, 2}  # only the two best ids, and both of them
    wide = {sample_token(logits, 5.0, 0, rng) for _ in range(400)}
    assert wide == {0, 1, 2, 3, 4}
    assert sample_token(logits, 0.0, 0, rng, banned=[1]) == 2  # the best allowed id
    allowed = {sample_token(logits, 5.0, 0, rng, banned=[1, 3]) for _ in range(400)}
    assert allowed == {0, 2, 4}
    assert never_sampled({"pad": 0, "bos": 1, "eos": 2}) == [0, 1]  # eos ends, never banned
    a = [sample_token(logits, 1.0, 0, np.random.default_rng(42)) for _ in range(5)]
    b = [sample_token(logits, 1.0, 0, np.random.default_rng(42)) for _ in range(5)]
    assert a == b


def greedy_lm_reference(m, prompt: str, n: int) -> str:
    ids = [CHARS.index(c) for c in prompt]
    out = []
    for _ in range(n):
        logits, _ = reference(m, np.array([ids]))
        tok = int(np.argmax(logits[0, -1]))
        out.append(CHARS[tok])
        ids.append(tok)
    return "".join(out)


async def test_lm_greedy_matches_reference(rt, zoo):
    pieces = await collect(rt.generate("charlm", "abc", 12, temperature=0))
    assert len(pieces) == 12
    assert "".join(pieces) == greedy_lm_reference(zoo[1]["charlm"], "abc", 12)


async def test_lm_sampling_is_seeded(rt):
    a = await collect(rt.generate("charlm", "ab", 30, temperature=1.0, seed=3))
    b = await collect(rt.generate("charlm", "ab", 30, temperature=1.0, seed=3))
    c = await collect(rt.generate("charlm", "ab", 30, temperature=1.0, seed=4))
    assert a == b and a != c
    assert set("".join(a)) <= set(CHARS)


def greedy_seq2seq_reference(refs, prompt: str, n: int) -> str:
    src = np.array([[CHARS.index(c) for c in prompt]])
    _, st = reference(refs["rev.encoder"], src)
    state = {"h0": st["hn"]}
    tok, out = 1, []  # bos
    for _ in range(n):
        logits, st = reference(refs["rev.decoder"], np.array([[tok]]), state)
        state = {"h0": st["hn"]}
        scores = logits[0, -1].copy()
        scores[[0, 1]] = -np.inf  # pad and bos are never generated
        tok = int(np.argmax(scores))
        if tok == 2:  # eos
            break
        out.append(TARGET[tok])
    return "".join(out)


@pytest.mark.parametrize("prompt", ["abc", "hg fe", "a"])
async def test_seq2seq_greedy_matches_reference(rt, zoo, prompt):
    got = "".join(await collect(rt.generate("rev", prompt, 10, temperature=0)))
    assert got == greedy_seq2seq_reference(zoo[1], prompt, 10)


async def test_seq2seq_greedy_depends_on_the_prompt(rt):
    outs = {
        "".join(await collect(rt.generate("rev", p, 6, temperature=0))) for p in ["abc", "hg fe"]
    }
    assert len(outs) == 2


async def test_seq2seq_sampling_stops_at_eos_or_max_tokens(rt):
    lengths = []
    for seed in range(10):
        pieces = await collect(rt.generate("rev", "abc", 8, temperature=1.5, seed=seed))
        assert len(pieces) <= 8 and "<eos>" not in pieces
        assert set(pieces) <= set("abcd")  # never pad or bos, however likely
        lengths.append(len(pieces))
    assert min(lengths) < 8 <= max(lengths)  # some runs met eos, some ran to max_tokens


async def test_encode_decode_and_errors(rt):
    ids = rt.encode_text("charlm", "bad hag")
    assert ids.dtype == np.int64 and rt.decode_tokens("charlm", ids) == "bad hag"
    with pytest.raises(InvalidArgument, match=r"characters \['x', 'z'\] are not in the vocabulary"):
        rt.encode_text("charlm", "zax")
    with pytest.raises(InvalidArgument, match=r"token ids must be integers in \[0, 9\)"):
        rt.decode_tokens("charlm", [3, 12])
    assert rt.decode_tokens("rev", [3, 4]) == "ab"  # seq2seq decodes with the target vocab
    with pytest.raises(InvalidArgument, match="no vocabulary"):
        rt.encode_text("gru", "ab")


async def test_generate_argument_errors(rt):
    with pytest.raises(InvalidArgument, match="max_tokens must be >= 1"):
        await collect(rt.generate("charlm", "a", 0))
    with pytest.raises(InvalidArgument, match="temperature must be >= 0"):
        await collect(rt.generate("charlm", "a", 3, temperature=-1))
    with pytest.raises(FailedPrecondition, match="does not generate text"):
        await collect(rt.generate("gru", "a", 3))
    with pytest.raises(InvalidArgument, match="non-empty prompt"):
        await collect(rt.generate("charlm", "", 3))
