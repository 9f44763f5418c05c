"""Shared test settings."""

import importlib.util

import pytest


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Small recurrent nets run fastest on one thread here: with two, OpenMP threads spin-wait
    on the shared cores and a small RNN step took ~50x longer. No-op on a serving-only install."""
    if importlib.util.find_spec("torch") is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """The runtime tests' model directory (onnx_fixtures.build_zoo), built once per test
    module; a module that needs the repository or the reference params defines its own."""
    from onnx_fixtures import build_zoo

    d = tmp_path_factory.mktemp("zoo")
    build_zoo(d)
    return d


@pytest.fixture(params=["dir", "redis"])
def state_store(request, tmp_path):
    """A ``--state-store`` for one test: the embedded store (a directory) or a real
    redis-server on a free loopback port, stopped after the test."""
    if request.param == "dir":
        yield str(tmp_path / "state")
        return
    from scaleout_harness import Redis

    r = Redis(tmp_path)
    yield r.url()
    r.stop()
