"""Runs gallery configurations in the gallery venv (.venv-gallery): for each, export_module,
verify_module, and where streamable ORT in random chunks against the whole sequence (a
one-step graph: ORT steps against the module's steps, the state carried on both). Prints
one JSON line per configuration; tests/test_gallery.py reads them.

    .venv-gallery/bin/python tests/gallery/run_gallery.py [NAME ...]   # all when none named
"""

from __future__ import annotations

import json
import signal
import sys
import tempfile
import time
import traceback
import warnings
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

MODULES = [
    "speechbrain_cases",
    "forecasting_cases",
    "darts_cases",
    "asteroid_cases",
    "neuralforecast_cases",
    "flair_cases",
]
DISTS = {
    "speechbrain": "speechbrain",
    "pytorch-forecasting": "pytorch-forecasting",
    "darts": "darts",
    "asteroid": "asteroid",
    "neuralforecast": "neuralforecast",
    "flair": "flair",
}
# verify_module's grid, cut to keep the gallery at seconds per configuration on 2 cores
GRID = {"times": (1, 3, 9), "batches": (1, 3), "stream": (24, 2)}
STREAM_T, STREAM_B = 37, 3
# one configuration takes 2-25 s on the shared 2-core host; a hung one must not eat CI's time
CASE_LIMIT_S = 180


class CaseTimeout(BaseException):
    """Raised by SIGALRM in a configuration that runs past CASE_LIMIT_S (not an Exception, so
    run_case's handlers do not take it for the exporter's answer)."""


def _too_long(signum, frame):
    raise CaseTimeout


def all_cases() -> list:
    import importlib

    cases = []
    for m in MODULES:
        cases += importlib.import_module(m).CASES
    return cases


def stream_through_ort(path: Path, module, contract, seed: int = 1) -> float:
    """Random chunks (1-8 steps) through ORT with the state carried vs the module's whole run."""
    import onnxruntime as ort

    from rnnzoo.export.module_verify import eager_module
    from rnnzoo.export.sampling import make_sampler

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(seed)
    xs, states = make_sampler(contract)(STREAM_B, STREAM_T, gen)
    with torch.no_grad():
        ref = eager_module(module, contract)(*xs, *states)
    st = {s.input: s0.numpy() for s, s0 in zip(contract.states, states, strict=True)}
    pieces, pos = [], 0
    while pos < STREAM_T:
        n = min(STREAM_T - pos, int(torch.randint(1, 9, (1,), generator=gen)))
        feeds = {}
        for spec, x in zip(contract.inputs, xs, strict=True):
            part = x if spec.time_axis is None else x.narrow(spec.time_axis, pos, n)
            feeds[spec.name] = part.numpy()
        got = sess.run(None, {**feeds, **st})
        pieces.append(got[: len(contract.outputs)])
        outs = got[len(contract.outputs) :]
        st = {s.input: v for s, v in zip(contract.states, outs, strict=True)}
        pos += n
    worst = 0.0
    for i, spec in enumerate(contract.outputs):
        whole = np.concatenate([p[i] for p in pieces], axis=spec.time_axis)
        worst = max(worst, float(np.abs(whole - ref[i].numpy()).max()))
    for j, s in enumerate(contract.states):
        final = ref[len(contract.outputs) + j].numpy()
        worst = max(worst, float(np.abs(st[s.input] - final).max()))
    return worst


def step_through_ort(path: Path, module, contract, seed: int = 1, steps: int = 8) -> float:
    """A one-step graph (no input has a time axis: the module is one step of a loop, like
    darts' autoregressive prediction): steps fed one after another through ORT with the state
    carried vs the module's own steps with its own state carried."""
    import onnxruntime as ort

    from rnnzoo.export.module_verify import eager_module
    from rnnzoo.export.sampling import make_sampler

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(seed)
    flat, sample, n = eager_module(module, contract), make_sampler(contract), len(contract.outputs)
    _, ref_states = sample(STREAM_B, 1, gen)
    ort_states = [s.numpy() for s in ref_states]
    worst = 0.0
    for _ in range(steps):
        xs, _ = sample(STREAM_B, 1, gen)
        with torch.no_grad():
            ref = flat(*xs, *ref_states)
        feeds = {spec.name: x.numpy() for spec, x in zip(contract.inputs, xs, strict=True)}
        feeds.update({s.input: v for s, v in zip(contract.states, ort_states, strict=True)})
        got = sess.run(None, feeds)
        worst = max(
            worst, *(float(np.abs(g - r.numpy()).max()) for g, r in zip(got, ref, strict=True))
        )
        ort_states, ref_states = got[n:], list(ref[n:])
    return worst


def run_case(case, workdir: Path) -> dict:
    from rnnzoo.errors import RnnzooError
    from rnnzoo.export import export_module, verify_module

    res = {
        "name": case.name,
        "library": case.library,
        "version": version(DISTS[case.library]),
        "exported": False,
        "verified": False,
        "streamable": None,
        "stream_diff": None,
        "error": None,
        "error_type": None,
        "stage": "build",
    }
    t0 = time.perf_counter()
    try:
        module, example = case.build()
        res["stage"] = "export"
        path = workdir / f"{case.name}.onnx"
        contract = export_module(module, example, path, name=case.name, **case.kwargs)
        res["exported"] = True
        res["streamable"] = contract.streamable
        res["reason"] = contract.extra.get("streamable_reason")
        res["stage"] = "verify"
        report = verify_module(module, path, **GRID)
        res["verified"] = bool(report.ok)
        if not report.ok:
            res["verify_summary"] = report.summary()[-2000:]
        if contract.streamable:
            res["stage"] = "stream"
            timed = any(t.time_axis is not None for t in contract.inputs)
            stream = stream_through_ort if timed else step_through_ort
            res["stream_diff"] = stream(path, module, contract)
        res["stage"] = "done"
    except RnnzooError as exc:
        res["error"], res["error_type"] = str(exc), type(exc).__name__
    except Exception as exc:  # a raw exception: what the gallery exists to catch
        res["error"], res["error_type"] = str(exc)[-3000:], f"raw {type(exc).__name__}"
        res["traceback"] = traceback.format_exc()[-4000:]
    res["seconds"] = round(time.perf_counter() - t0, 2)
    return res


def main(names: list[str]) -> int:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    cases = [c for c in all_cases() if not names or c.name in names]
    signal.signal(signal.SIGALRM, _too_long)
    with tempfile.TemporaryDirectory() as d:
        for case in cases:
            signal.alarm(CASE_LIMIT_S)
            try:
                res = run_case(case, Path(d))
            except CaseTimeout:
                res = {"name": case.name, "library": case.library, "exported": False}
                res["version"] = version(DISTS[case.library])
                res.update(verified=False, stage="timeout", error_type="raw timeout")
                res["error"] = f"took over {CASE_LIMIT_S} s"
            signal.alarm(0)
            print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    raise SystemExit(main(sys.argv[1:]))
