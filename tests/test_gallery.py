"""Other people's recurrent modules: a gallery of configurations from published libraries
(speechbrain, pytorch-forecasting, darts, asteroid, neuralforecast, flair; 38 configurations in
tests/gallery/*_cases.py), each built with random weights and called as its own users call it,
exported with ``export_module``, verified with ``verify_module``, and, where streamable, run
through ONNX Runtime in random chunks with the state carried against the whole sequence
(<= 1e-5; a one-step graph: step by step against the module's own steps). What cannot be
expressed must be refused with a clear ``InvalidArgument`` whose reason the case names;
nothing may fail with a raw exception.

The libraries live in their own venv, ``.venv-gallery`` (``scripts/setup-gallery.sh``, pinned
versions beside torch 2.13.0 and this checkout's rnnzoo, editable): one subprocess runs every
configuration (``tests/gallery/run_gallery.py``) and each test reads its own line.

A configuration the exporter gets wrong may carry ``known_failure`` (none does today): it is
then ``xfail(strict=True)``, so a fix turns it into XPASS, a failure here until the entry is
updated.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from gallery_venv import ROOT, gallery_python

sys.path.insert(0, str(Path(__file__).with_name("gallery")))
from gallery_case import EXPORTS, REFUSED, STREAMS
from run_gallery import all_cases

CASES = all_cases()
RUN = Path(__file__).with_name("gallery") / "run_gallery.py"
TOL = 1e-5


@pytest.fixture(scope="module")
def results() -> dict[str, dict]:
    r = subprocess.run(
        [str(gallery_python()), str(RUN)], capture_output=True, text=True, timeout=1200, cwd=ROOT
    )
    assert r.returncode == 0, r.stderr[-4000:]
    lines = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]
    return {res["name"]: res for res in lines}


def _param(case):
    marks = [pytest.mark.xfail(strict=True, reason=case.known_failure)] * bool(case.known_failure)
    return pytest.param(case, id=case.name, marks=marks)


def test_the_gallery_has_twenty_configurations_from_four_libraries_at_the_pinned_versions(
    results,
):
    per_library = Counter(c.library for c in CASES)
    assert len(CASES) >= 20 and len(per_library) >= 4, per_library
    assert sorted(results) == sorted(c.name for c in CASES)
    script = (ROOT / "scripts" / "setup-gallery.sh").read_text()
    for res in results.values():
        assert f"{res['library']}=={res['version']}" in script, res


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_a_published_module_exports_verifies_and_streams_or_is_refused_clearly(results, case):
    res = results[case.name]
    assert not (res["error_type"] or "").startswith("raw"), (
        f"{case.name}: a raw exception at {res['stage']}: {res['error']}\n{res.get('traceback')}"
    )
    if case.expect == REFUSED:
        assert res["error_type"] == "InvalidArgument", f"{case.name}: not refused: {res}"
        assert re.search(case.why, res["error"]), res["error"]
        return
    assert res["exported"], f"{case.name}: not exported: {res['error']}"
    assert res["verified"], f"{case.name}: {res['error'] or res.get('verify_summary')}"
    if case.expect == STREAMS:
        assert res["streamable"] is True, f"{case.name}: not streamable: {res.get('reason')}"
        assert res["stream_diff"] <= TOL, f"{case.name}: chunks differ by {res['stream_diff']}"
    else:
        assert case.expect == EXPORTS
        assert res["streamable"] is False, f"{case.name}: exported as streamable"
        assert case.why.lower() in (res.get("reason") or "").lower(), res.get("reason")
