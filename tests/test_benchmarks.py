"""The benchmark harness at toy size: structure of the result, and that every ratio and
target is made from the numbers measured in the same run. No timing assertions."""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import sys
from dataclasses import replace

import pytest

from rnnzoo.benchmarks.cli import main as bench_main
from rnnzoo.benchmarks.harness import BenchConfig, one_session_bound, run
from rnnzoo.benchmarks.load import run_cell
from rnnzoo.benchmarks.report import NOTES_BEGIN, NOTES_END, text, write_doc
from rnnzoo.benchmarks.servers import ServerProcess, echo_server
from rnnzoo.errors import Unavailable

SYSTEMS = ("echo", "naive", "rnnzoo")


@pytest.fixture(scope="module")
def result() -> dict:
    cfg = replace(
        BenchConfig.quick(),
        sessions=(1, 3),
        steps=(1, 2),
        delays_ms=(0.0, 2.0),
        delay_sessions=3,
        many_sessions=(3,),
    )
    return run(cfg, log=lambda _msg: None)


def _cell(rows, n, t):
    (c,) = [r for r in rows if r["sessions"] == n and r["steps"] == t]
    return c


@pytest.mark.slow
def test_result_structure(result):
    json.dumps(result)  # --json must be able to write it
    cfg = result["config"]
    assert result["format"] == "rnnzoo.bench/1"
    for key in ("cpu", "cores", "onnxruntime", "torch", "grpcio", "loadavg_at_end"):
        assert key in result["machine"]
    for system in SYSTEMS:
        rows = result["servers"][system]
        assert {(r["sessions"], r["steps"]) for r in rows} == {
            (n, t) for n in cfg["sessions"] for t in cfg["steps"]
        }
        for r in rows:
            assert r["messages"] > 0 and r["window_s"] > 0
            assert len(r["rounds"]) == cfg["rounds"]
            for one in r["rounds"]:  # each round is a measurement of its own
                assert one["steps_per_s"] == pytest.approx(
                    one["messages"] * one["steps"] / one["window_s"]
                )
                assert 0 < one["p50_ms"] <= one["p99_ms"]
            # the cell is the median round
            assert r["steps_per_s"] == statistics.median(x["steps_per_s"] for x in r["rounds"])
            assert r["p99_ms"] == statistics.median(x["p99_ms"] for x in r["rounds"])
            assert r["messages"] == sum(x["messages"] for x in r["rounds"])
            assert r["server_cpu_us_per_msg"] is None or r["server_cpu_us_per_msg"] >= 0
            assert r["loadavg_1m"] >= 0
    opts = result["ort_options"]  # every option set x (smallest, largest batch) x idle/busy
    names = {r["options"] for r in opts}
    assert len(names) == 4 and any(n.startswith("rnnzoo:") for n in names)
    assert {(r["options"], r["batch"], r["busy_core"]) for r in opts} == {
        (n, b, busy)
        for n in names
        for b in (min(cfg["batches"]), max(cfg["batches"]))
        for busy in (False, True)
    }
    assert all(r["steps_per_s"] > 0 for r in opts)
    cold = result["cold_call"]
    echo1 = _cell(result["servers"]["echo"], min(cfg["sessions"]), 1)
    assert cold["gap_us"] == pytest.approx(1e6 / echo1["msgs_per_s"])
    assert cold["hot_us"] > 0 and 0 < cold["median_us"] <= cold["p90_us"]
    ort, tch = result["compute"]["ort"], result["compute"]["torch"]
    assert {(r["batch"], r["steps"]) for r in ort} == {
        (b, t) for b in cfg["batches"] for t in cfg["steps"]
    }
    assert {(r["batch"], r["steps"]) for r in tch} == {
        (b, t) for b in cfg["torch_batches"] for t in cfg["steps"]
    }
    for r in ort + tch:
        assert r["steps_per_s"] == pytest.approx(r["calls_per_s"] * r["batch"] * r["steps"])
    before, after = result["compute_runs"]
    for k in ("ort", "torch"):  # the limit used is the better of the two measured runs
        best = [
            max(a["steps_per_s"], b["steps_per_s"])
            for a, b in zip(before[k], after[k], strict=True)
        ]
        assert [r["steps_per_s"] for r in result["compute"][k]] == best
    delays = [sw["max_delay_ms"] for sw in result["delay_sweep"]]
    assert delays == list(cfg["delays_ms"])
    for sw in result["delay_sweep"]:
        assert {c["steps"] for c in sw["cells"]} == set(cfg["steps"])
        assert {c["sessions"] for c in sw["cells"]} == {cfg["delay_sessions"]}


@pytest.mark.slow
def test_every_ratio_is_made_from_measured_numbers(result):
    s, ort, tch = result["servers"], result["compute"]["ort"], result["compute"]["torch"]
    cfg = result["config"]
    ref_b = max(cfg["batches"])
    want = set()
    for r in result["ratios"]:
        assert r["value"] == pytest.approx(r["numerator"] / r["denominator"])
        n, t = r["sessions"], r["steps"]
        if r["name"] in ("D/B", "D/C", "D/M", "M/B"):
            key = {"D/B": "echo", "D/C": "naive", "D/M": "minimal", "M/B": "echo"}[r["name"]]
            other = _cell(s[key], n, t)
            d = _cell(s["minimal" if r["name"] == "M/B" else "rnnzoo"], n, t)
            assert r["numerator"] == d["steps_per_s"]
            assert r["denominator"] == other["steps_per_s"]
            assert r["per_round"] == [
                a["steps_per_s"] / b["steps_per_s"]
                for a, b in zip(d["rounds"], other["rounds"], strict=True)
            ]
        elif r["name"] == "S/D":  # StepMany against per-session Streams, same cell
            m, d = _cell(s["stepmany"], n, t), _cell(s["rnnzoo"], n, t)
            assert (r["numerator"], r["denominator"]) == (m["steps_per_s"], d["steps_per_s"])
            assert r["per_round"] == [
                a["steps_per_s"] / b["steps_per_s"]
                for a, b in zip(m["rounds"], d["rounds"], strict=True)
            ]
        elif r["name"] == "D/A":
            assert r["batch"] == ref_b
            assert r["numerator"] == _cell(s["rnnzoo"], n, t)["steps_per_s"]
            (a,) = [a for a in ort if a["batch"] == ref_b and a["steps"] == t]
            assert r["denominator"] == a["steps_per_s"]
        else:
            assert r["name"] == "A/E"
            (a,) = [a for a in ort if a["batch"] == r["batch"] and a["steps"] == t]
            (e,) = [e for e in tch if e["batch"] == r["batch"] and e["steps"] == t]
            assert (r["numerator"], r["denominator"]) == (a["steps_per_s"], e["steps_per_s"])
        want.add((r["name"], n, t, r["batch"]))
    # every ratio the issue asks for is there, for every measured cell
    for n in cfg["sessions"]:
        for t in cfg["steps"]:
            for name in ("D/B", "D/C"):
                assert (name, n, t, None) in want
            assert ("D/A", n, t, ref_b) in want
    # StepMany at its sessions, 1 step per chunk; its steps count session-steps
    assert [(c["sessions"], c["steps"]) for c in s["stepmany"]] == [(3, 1)]
    assert ("S/D", 3, 1, None) in want
    for one in s["stepmany"][0]["rounds"]:
        # window_s is rounded to 0.1 ms
        assert one["steps_per_s"] == pytest.approx(3 * one["messages"] / one["window_s"], rel=1e-3)
    for b in set(cfg["batches"]) & set(cfg["torch_batches"]):
        for t in cfg["steps"]:
            assert ("A/E", None, t, b) in want
    # the minimal server runs at 1 session, 1 step/message only: the lean path's floor
    assert [(c["sessions"], c["steps"]) for c in s["minimal"]] == [(1, 1)]
    assert ("D/M", 1, 1, None) in want and ("M/B", 1, 1, None) in want


@pytest.mark.slow
def test_targets_quote_the_ratios(result):
    by_key = {(r["name"], r["sessions"], r["steps"]): r["value"] for r in result["ratios"]}
    targets = result["targets"]
    assert len(targets) == 6
    # the lean path's target is 0.95 x the bound measured in the same run
    assert targets[0]["want"] == round(0.95 * one_session_bound(result)[0], 3)
    assert f"({targets[0]['want']})" in targets[0]["target"]
    for t in targets[:5]:
        name = t["target"].split()[0]
        assert t["measured"] == by_key[(name, t["sessions"], t["steps"])]
        assert t["met"] == (t["measured"] >= t["want"])
    d = _cell(result["servers"]["rnnzoo"], targets[5]["sessions"], 1)
    assert targets[5]["measured"] == d["p99_ms"]


@pytest.mark.slow
def test_report_writes_doc_and_plot_and_keeps_notes(result, tmp_path):
    assert "D/B" in text(result) and "ORT session options" in text(result)
    doc = tmp_path / "docs" / "benchmarks.md"
    doc, png = write_doc(result, doc)
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    body = doc.read_text()
    d = _cell(result["servers"]["rnnzoo"], 1, 1)
    assert f"{d['steps_per_s']:.0f}" in body and result["machine"]["cpu"] in body
    doc.write_text(body.replace("(no notes yet)", "hand-written finding 42"))
    write_doc(result, doc)
    body = doc.read_text()
    assert (
        "hand-written finding 42" in body and body.count(NOTES_BEGIN) == body.count(NOTES_END) == 1
    )


def test_echo_server_answers_with_same_size_outputs():
    with echo_server("y", 3) as srv:
        r = asyncio.run(
            run_cell(
                srv.target,
                "anything",
                2,
                4,
                features=1,
                warmup_s=0.05,
                duration_s=0.2,
                server_pid=srv.proc.pid,
            )
        )
    assert r.messages > 0 and r.sessions == 2 and r.steps == 4
    assert r.server_cpu_us_per_msg is not None and not math.isnan(r.client_cpu_us_per_msg)


def test_server_that_never_gets_ready_is_reported_with_its_stderr():
    cmd = [sys.executable, "-c", "import sys; sys.stderr.write('boom: no models'); sys.exit(3)"]
    with pytest.raises(Unavailable, match="boom: no models"):
        ServerProcess(cmd, "broken", start_timeout_s=20).start()


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["--sessions", "0"], "--sessions values must be >= 1"),
        (["--steps", "a,b"], "--steps takes comma-separated integers"),
        (["--duration", "0"], "--duration must be > 0"),
        (["--rounds", "0"], "--rounds must be >= 1"),
        (["--delays", "-1"], "--delays values must be >= 0"),
    ],
)
def test_cli_rejects_bad_arguments(argv, msg, capsys):
    assert bench_main(["--quick", *argv]) == 2
    assert msg in capsys.readouterr().err


def test_worker_scaling_targets_are_judged_only_with_cores_the_client_did_not_take():
    from rnnzoo.benchmarks.workers import scaling_targets

    def cell(w, ratio, client_us, sps=10_000.0):
        return {
            "workers": w,
            "sessions": 64,
            "steps_per_s": sps,
            "ratio_to_1": ratio,
            "client_cpu_us_per_msg": client_us,
        }

    # 16 cores, client ~1 core (100 us/msg x 10k msg/s): 8 workers judged, 16 not
    got = scaling_targets(
        {
            "usable_cores": 16,
            "cells": [cell(1, 1.0, 100), cell(8, 6.5, 100), cell(8, 5.0, 100), cell(16, 9.0, 100)],
        }
    )
    assert [t["workers"] for t in got] == [8, 8, 16]
    assert got[0]["want"] == 6.0 and got[0]["met"] is True and got[1]["met"] is False
    assert got[2]["met"] is None and "the client took 1" in got[2]["why_not_judged"]
    # 2 shared cores: reported as measured, never judged
    (two,) = scaling_targets({"usable_cores": 2, "cells": [cell(2, 1.18, 150)]})
    assert two["measured"] == 1.18 and two["met"] is None


def test_unary_step_benchmark_reports_both_kinds_from_one_run(tmp_path):
    """benchmarks/unary_step.py at toy size: both kinds measured, the ratio made from them."""
    from onnx_fixtures import build_rnn

    from rnnzoo.benchmarks import unary_step

    build_rnn(tmp_path / "gru.onnx", cell="gru", seed=1)
    out = tmp_path / "unary.json"
    assert unary_step.main(["--model-dir", str(tmp_path), "--n", "20", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    seq, stateless = r["sequence_step"], r["stateless"]
    assert r["n"] == 20 and seq["p50_us"] > 0 and stateless["p50_us"] > 0
    assert r["p50_ratio"] == round(seq["p50_us"] / stateless["p50_us"], 3)
