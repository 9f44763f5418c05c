"""Runs gallery configurations in the gallery venv (.venv-gallery): for each, export_module,
verify_module, and ORT in random chunks against the whole sequence where streamable. Prints
one JSON line per configuration; tests/test_gallery.py reads them.

    .venv-gallery/bin/python tests/gallery/run_gallery.py [NAME ...]   # all when none named
"""

from __future__ import annotations

import json
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
            res["stream_diff"] = stream_through_ort(path, module, contract)
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
    with tempfile.TemporaryDirectory() as d:
        for case in cases:
            print(json.dumps(run_case(case, Path(d))), flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    raise SystemExit(main(sys.argv[1:]))
