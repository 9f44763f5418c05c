"""Run by tests/test_kserve_tritonclient.py under .venv-triton/bin/python against a server
with ``--model-control explicit`` and a versioned repository (model "m", versions 1 and 2):
the repository RPCs through the unmodified tritonclient, and the final-response flag a client
waits for.

    python tritonclient_repository.py HOST:PORT

It imports nothing of rnnzoo: only tritonclient and numpy.
"""

from __future__ import annotations

import queue
import sys

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


def index(client) -> dict:
    resp = client.get_model_repository_index()
    return {(m.name, m.version): (m.state, m.reason) for m in resp.models}


def main(target: str) -> int:
    client = grpcclient.InferenceServerClient(target)
    assert "model_repository" in client.get_server_metadata(as_json=True)["extensions"]
    before = index(client)
    assert before[("m", "2")][0] == "UNAVAILABLE", before
    assert not client.is_model_ready("m")
    client.load_model("m")
    assert client.is_model_ready("m") and client.is_model_ready("m", "2")
    assert not client.is_model_ready("m", "1")  # latest 1: version 2 only
    assert index(client)[("m", "2")] == ("READY", ""), index(client)
    meta = client.get_model_metadata("m", as_json=True)
    assert meta["versions"] == ["2"], meta

    x = np.random.default_rng(0).normal(size=(1, 4, 3)).astype(np.float32)
    inp = grpcclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    assert client.infer("m", [inp]).get_response().model_version == "2"

    # every stream response is final, as Triton's: a client waiting for the flag never hangs
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    for i in range(3):
        client.async_stream_infer(
            "m",
            [inp],
            request_id=f"r{i}",
            sequence_id=9,
            sequence_start=i == 0,
            sequence_end=i == 2,
            enable_empty_final_response=True,
        )
        while True:
            result, error = results.get(timeout=10)
            assert error is None, error
            params = result.get_response().parameters
            if params["triton_final_response"].bool_param:
                break
        assert result.get_response().id == f"r{i}"
    client.stop_stream()

    client.unload_model("m")
    assert not client.is_model_ready("m")
    state, reason = index(client)[("m", "2")]
    assert state in ("UNLOADING", "UNAVAILABLE") and "unloaded" in reason, (state, reason)
    try:
        client.infer("m", [inp])
    except InferenceServerException as exc:
        assert exc.status() == "StatusCode.FAILED_PRECONDITION", exc.status()
    else:
        raise AssertionError("an unloaded model answered")
    try:
        client.load_model("nope")
    except InferenceServerException as exc:
        assert exc.status() == "StatusCode.NOT_FOUND", exc.status()
    else:
        raise AssertionError("an unknown model loaded")
    client.load_model("m")
    assert client.is_model_ready("m")
    print("tritonclient repository: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
