"""Run by tests/test_kserve_tritonclient.py under .venv-triton/bin/python (the unmodified
``tritonclient[grpc]``, which pins protobuf < 7): drives a real rnnzoo server's KServe v2 /
Triton service and exits non-zero on any mismatch.

    python tritonclient_check.py HOST:PORT

It imports nothing of rnnzoo: only tritonclient and numpy.
"""

from __future__ import annotations

import queue
import sys

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

TOL = 1e-5


def main(target: str) -> int:
    client = grpcclient.InferenceServerClient(target)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("lstm2") and not client.is_model_ready("no-such-model")
    server = client.get_server_metadata(as_json=True)
    assert "sequence" in server["extensions"], server
    meta = client.get_model_metadata("lstm2", as_json=True)
    assert [int(d) for d in meta["inputs"][0]["shape"]] == [-1, -1, 3], meta
    assert meta["inputs"][0]["datatype"] == "FP32" and meta["outputs"][0]["name"] == "y"
    config = client.get_model_config("lstm2", as_json=True)["config"]
    assert "sequence_batching" in config, config
    assert [s["input_name"] for s in config["sequence_batching"]["state"]] == ["h0", "c0"]

    rng = np.random.default_rng(0)
    xs = {
        101: rng.normal(size=(1, 12, 3)).astype(np.float32),
        "user-b": rng.normal(size=(1, 12, 3)).astype(np.float32),
    }

    def inputs(x: np.ndarray) -> list:
        inp = grpcclient.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        return [inp]

    whole = {}
    for seq, x in xs.items():
        res = client.infer("lstm2", inputs(x), request_id=f"whole-{seq}")
        assert res.get_response().id == f"whole-{seq}"
        whole[seq] = res.as_numpy("y")
        assert whole[seq].shape == (1, 12, 2), whole[seq].shape

    # interleaved sequences over one stream, then one bad request: its error comes back in
    # band and the stream goes on
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    cuts = [(0, 1), (1, 5), (5, 6), (6, 12)]
    for i, (a, b) in enumerate(cuts):
        for seq, x in xs.items():
            client.async_stream_infer(
                "lstm2",
                inputs(x[:, a:b]),
                request_id=f"{seq}/{i}",
                sequence_id=seq,
                sequence_start=i == 0,
                sequence_end=i == len(cuts) - 1,
            )
    got: dict = {seq: [] for seq in xs}
    for _ in range(len(cuts) * len(xs)):
        result, error = results.get(timeout=30)
        assert error is None, error
        rid = result.get_response().id
        seq = int(rid.split("/")[0]) if rid.startswith("101") else rid.split("/")[0]
        got[seq].append(result.as_numpy("y"))
    client.async_stream_infer("lstm2", inputs(xs[101][:, :1]), request_id="late", sequence_id=101)
    result, error = results.get(timeout=30)
    assert result is None and isinstance(error, InferenceServerException), (result, error)
    assert "NOT_FOUND" in str(error) and "sequence_end" in str(error), str(error)
    client.async_stream_infer("lstm2", inputs(xs[101]), request_id="after-error")
    result, error = results.get(timeout=30)
    assert error is None, error
    client.stop_stream()
    worst = 0.0
    for seq in xs:
        streamed = np.concatenate(got[seq], axis=1)
        worst = max(worst, float(np.abs(streamed - whole[seq]).max()))
    assert worst <= TOL, worst
    np.testing.assert_allclose(result.as_numpy("y"), whole[101], atol=TOL)

    # a bidirectional model: revised outputs for the whole prefix, as response parameters
    x = xs[101]
    first = client.infer("bigru", inputs(x[:, :5]), sequence_id=7, sequence_start=True)
    second = client.infer("bigru", inputs(x[:, 5:]), sequence_id=7, sequence_end=True)
    params = second.get_response().parameters
    assert params["revised"].bool_param and params["start"].int64_param == 0
    np.testing.assert_allclose(
        second.as_numpy("y"), client.infer("bigru", inputs(x)).as_numpy("y"), atol=TOL
    )
    assert first.as_numpy("y").shape[1] == 5

    # a text model: a BYTES input carries the text
    text = grpcclient.InferInput("text", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"abc hgf"], dtype=np.object_))
    logits = client.infer("charlm", [text]).as_numpy("logits")
    assert logits.shape[:2] == (1, 7), logits.shape

    # errors carry the same codes as rnnzoo.v1
    try:
        client.infer("lstm2", inputs(x[:, :, :2]))
    except InferenceServerException as exc:
        assert exc.status() == "StatusCode.INVALID_ARGUMENT", exc.status()
    else:
        raise AssertionError("a wrong feature size was accepted")
    print(f"tritonclient: ok (streamed vs whole: max |diff| {worst:.2e})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
