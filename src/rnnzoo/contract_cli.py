"""``rnnzoo contract init MODEL.onnx`` and ``rnnzoo contract check MODEL.onnx``.

``init`` reads a graph exported elsewhere, runs it, and writes ``MODEL.rnnzoo.json`` with its
guesses:
- state pairs, by name (``state``->``stateN``, ``h0``->``hn``, ``*_in``->``*_out``, ...) with the
  same dtype and compatible shapes (an unknown dim or shape matches: the input's is taken),
  else by equal shapes for tensors whose only symbolic dim is the batch;
- constants: rank-0 inputs, and inputs without a batch dim, with their dtype and the value
  ``null`` (or the ``--set NAME=VALUE`` given), which the server refuses until it is set;
- batch and time axes, and a chunk rule, by probe runs (``rnnzoo.contract_probe``): graphs
  from other tools often name no dim at all. Where no layout runs, from symbolic dims: the
  dim name most tensors share is the batch, a data tensor's other symbolic dim its time.
It prints what it guessed and what the user must check. ``check`` validates the contract
(schema, graph, and a probe run at batch 1 and 2) and names each wrong field. Neither raises:
an unreadable file or sidecar is said in one line.

No torch: the serving install runs it (onnx, onnxruntime).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from rnnzoo.contract import CONTRACT_FORMAT, sidecar_path
from rnnzoo.contract_probe import LENGTHS
from rnnzoo.errors import InvalidArgument, RnnzooError

# a rank-0 integer input named like a sample rate: the probe runs it at 16 kHz (not written)
SAMPLE_RATE = re.compile(r"^(sr|fs|sample_?rate|sampling_?rate|samplerate)$", re.IGNORECASE)
ONNX_DTYPES = {1: "float32", 11: "float64", 10: "float16", 7: "int64", 6: "int32", 9: "bool"}
# (input pattern, output template) tried in order; \1 is the shared stem
NAME_RULES = [
    (r"^(.*)$", r"\1N"),
    (r"^(.*)$", r"\1n"),
    (r"^(.*)_in$", r"\1_out"),
    (r"^(.*)in$", r"\1out"),
    (r"^(.*)_in(_.*)$", r"\1_out\2"),
    (r"^(.*)0$", r"\1n"),
    (r"^(.*)0$", r"\1N"),
    (r"^(.*)_0$", r"\1_n"),
    (r"^(.*)$", r"\1_out"),
    (r"^(.*)$", r"\1_next"),
    (r"^(.*)$", r"next_\1"),
    (r"^(.*)$", r"new_\1"),
    (r"^(.*)_prev$", r"\1_next"),
    (r"^past_(.*)$", r"present_\1"),
    (r"^(.*)_t$", r"\1_t1"),
]


def _tensors(values) -> dict[str, tuple[str, list]]:
    """name -> (dtype, shape with ints, dim names, or None for an unknown dim)."""
    out = {}
    for v in values:
        t = v.type.tensor_type
        dims: list[int | str | None] = []
        for d in t.shape.dim if t.HasField("shape") else []:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            else:
                dims.append(d.dim_param or None)
        out[v.name] = (ONNX_DTYPES.get(t.elem_type, f"onnx-type-{t.elem_type}"), dims)
    return out


def _compatible(a: tuple[str, list], b: tuple[str, list]) -> bool:
    """Same dtype, and shapes that can be equal: an unknown or symbolic dim (or an unknown
    shape) matches anything, as in Silero VAD's ``stateN: [?, ?, ?]`` and its opset-15 file's
    ``[AddstateN_dim_0, batch, AddstateN_dim_2]`` for ``state: [2, batch, 128]``; two fixed
    dims must agree."""
    (dt_a, sh_a), (dt_b, sh_b) = a, b
    if dt_a != dt_b:
        return False
    if not sh_b or not sh_a:
        return True
    if len(sh_a) != len(sh_b):
        return False
    return all(
        x == y or not isinstance(x, int) or not isinstance(y, int)
        for x, y in zip(sh_a, sh_b, strict=True)
    )


def _pair_states(g_in: dict, g_out: dict, batch: str | None) -> list[tuple[str, str, str]]:
    """(input, output, how) for every state pair guessed."""
    pairs, used = [], set()
    for name, spec in g_in.items():
        if len(spec[1]) < 2:
            continue  # a state has a batch dim and something per sequence
        for pat, tmpl in NAME_RULES:
            m = re.match(pat, name)
            if not m:
                continue
            cand = m.expand(tmpl)
            if cand in g_out and cand not in used and _compatible(spec, g_out[cand]):
                how = "equal shapes" if g_out[cand] == spec else f"output shape {g_out[cand][1]}"
                pairs.append((name, cand, f"name rule {name} -> {cand}, {how}"))
                used.add(cand)
                break
    paired = {p[0] for p in pairs}
    for name, (dt, shape) in g_in.items():
        symbolic = [d for d in shape if not isinstance(d, int)]
        if name in paired or len(shape) < 2 or len(symbolic) != 1:
            continue
        same = [o for o, v in g_out.items() if o not in used and v == (dt, shape)]
        if len(same) == 1:
            pairs.append((name, same[0], "equal shapes (only the batch dim symbolic)"))
            used.add(same[0])
    return pairs


def _spec(name: str, dt: str, shape: list, batch: str | None, axes=None) -> tuple[dict, list[str]]:
    """A data tensor's contract entry and what was guessed about it; ``axes`` (batch, time)
    from the probe run wins over the guess from symbolic dims."""
    if axes is not None:
        b_axis, t_axis = axes
        others = []
    else:
        b_axis = next((i for i, d in enumerate(shape) if d == batch), None)
        others = [i for i, d in enumerate(shape) if not isinstance(d, int) and i != b_axis]
        t_axis = others[0] if others else None
    dims = []
    for i, d in enumerate(shape):
        if i == b_axis:
            dims.append("batch")
        elif i == t_axis:
            dims.append("time")
        else:
            dims.append(d if d is not None else f"dim{i}")
    how = "by a probe run" if axes is not None else "from symbolic dims"
    notes = [f"batch_axis={b_axis}", f"time_axis={t_axis} ({how})"]
    if len(others) > 1:
        notes.append(f"other symbolic dims {[shape[i] for i in others[1:]]} left symbolic")
    spec = {"name": name, "dtype": dt, "shape": dims, "batch_axis": b_axis, "time_axis": t_axis}
    return spec, notes


def _load(path: Path):
    """The graph, or InvalidArgument saying why it is not one."""
    import onnx

    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends: not a model file
        raise InvalidArgument(
            f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc}); "
            "`contract init` takes the .onnx file itself"
        ) from exc


def _session(path: Path):
    import onnxruntime as ort

    from rnnzoo.ort_options import session_options

    so = session_options()
    so.log_severity_level = 4  # the probe's failed layouts are expected: not logged as errors
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT's own exception types
        return f"ONNX Runtime cannot load it: {' '.join(str(exc).split())[:300]}"


def _probe_value(name: str, dt: str, shape: list, given: dict) -> tuple[np.ndarray, str]:
    """A constant's value for the probe runs and where it came from."""
    if name in given:
        try:
            return np.asarray(given[name], dtype=dt), "given"
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(
                f"--set {name}={json.dumps(given[name])}: not a value of dtype {dt} for input {name!r} "
                f"(shape {shape}): {exc}"
            ) from exc
    dims = [d if isinstance(d, int) else 1 for d in shape]
    if not dims and SAMPLE_RATE.match(name) and dt.startswith("int"):
        return np.asarray(16000, dtype=dt), "a common sample rate, guessed from its name"
    return np.zeros(dims, dtype=dt), "zeros"


def guess(
    path: str | Path, values: dict[str, Any] | None = None
) -> tuple[dict, list[str], list[str]]:
    """(contract dict, what was guessed, what to check) for the graph at ``path``.

    ``values``: constants' values (``--set sr=16000``), written and used by the probe run."""
    from rnnzoo.contract_probe import settle

    path = Path(path)
    values = dict(values or {})
    model = _load(path)
    inits = {i.name for i in model.graph.initializer}
    g_in = _tensors(v for v in model.graph.input if v.name not in inits)
    g_out = _tensors(model.graph.output)
    unknown = sorted(set(values) - set(g_in))
    if unknown:
        raise InvalidArgument(
            f"--set {unknown[0]}=...: the graph has no input {unknown[0]!r}; its inputs are "
            f"{sorted(g_in)}"
        )
    counts = Counter(
        d
        for _, shape in [*g_in.values(), *g_out.values()]
        for d in set(shape)
        if isinstance(d, str)
    )
    batch = counts.most_common(1)[0][0] if counts else None
    guessed = [f"batch dim name: {batch!r} (symbolic in {counts[batch] if batch else 0} tensors)"]
    check: list[str] = []
    pairs = _pair_states(g_in, g_out, batch)
    in_states = {p[0] for p in pairs}
    out_states = {p[1] for p in pairs}
    const_names = [
        n
        for n, (_, shape) in g_in.items()
        if n not in in_states and (not shape or (batch not in shape and None not in shape))
    ]
    const_names += [n for n in values if n not in const_names and n not in in_states]
    data = {n: v for n, v in g_in.items() if n not in in_states and n not in const_names}
    if not data:
        check.append(
            "inputs: none found: every input of the graph is rank 0 or has only fixed dims, so "
            "all were taken for constants. rnnzoo batches sessions along a symbolic batch dim: "
            "a graph exported for one fixed shape (batch 1) must be re-exported with a dynamic "
            "batch axis"
        )
    probe_values, probe_notes = {}, []
    for n in const_names:
        probe_values[n], where = _probe_value(n, *g_in[n], values)
        if where != "given":
            probe_notes.append(f"{n}={probe_values[n].tolist()} ({where})")
    session = _session(path)
    layout, why = None, session if isinstance(session, str) else ""
    if not isinstance(session, str):
        st = [(si, so, *g_in[si]) for si, so, _ in pairs]
        outs = [o for o in g_out if o not in out_states]
        layout, why = settle(session, data, st, probe_values, outs, batch)
    if layout is None:
        guessed.append(f"probe run: none of the layouts tried ran ({why}); axes from names")
        check.append(
            "axes: the graph did not run under any layout tried, so batch_axis/time_axis come "
            f"from symbolic dims only: check them ({why})"
        )
    else:
        ran = f"ran at lengths {layout.lengths_ok}" if layout.lengths_ok else "ran"
        extra = f", with {', '.join(probe_notes)}" if probe_notes else ""
        guessed.append(f"probe run: the graph {ran} (batch 1 and 2{extra})")
    states = []
    for si, so, how in pairs:
        dt, shape = g_in[si]
        if layout is not None:
            ax = layout.states[si]
        else:
            sym = [i for i, d in enumerate(shape) if not isinstance(d, int)]
            ax = next((i for i in sym if shape[i] == batch), sym[0] if sym else 0)
        dims = ["batch" if i == ax else d for i, d in enumerate(shape)]
        states.append(
            {
                "input": si,
                "output": so,
                "dtype": dt,
                "shape": dims,
                "batch_axis": ax,
                "init": "zeros",
            }
        )
        guessed.append(f"state {si} -> {so} ({how}), batch_axis={ax}, init zeros")
    inputs, constants = [], []
    for name in const_names:
        dt, shape = g_in[name]
        value = values.get(name)
        constants.append({"name": name, "dtype": dt, "value": value})
        guessed.append(f"constant {name} ({dt}, rank {len(shape)}): value {json.dumps(value)}")
        if value is None:
            check.append(
                f"constants: set the value of {name!r} ({dt}, shape {shape}; a scalar is fed as "
                "a 0-d tensor): the server refuses the file until it is set"
                + (f" (the probe ran with {probe_values[name].tolist()})" if layout else "")
            )
    for name, (dt, shape) in data.items():
        spec, notes = _spec(name, dt, shape, batch, layout.inputs[name] if layout else None)
        inputs.append(spec)
        guessed.append(f"input {name} {shape}: " + ", ".join(notes))
    outputs = []
    for name, (dt, shape) in g_out.items():
        if name in out_states:
            continue
        spec, notes = _spec(name, dt, shape, batch, layout.outputs[name] if layout else None)
        outputs.append(spec)
        guessed.append(f"output {name} {shape}: " + ", ".join(notes))
        if spec["time_axis"] is None:
            check.append(f"output {name!r} has no time axis: given once per chunk?")
    stem = path.name.removesuffix(".onnx")
    contract = {
        "format": CONTRACT_FORMAT,
        "name": stem,
        "task": "generic",
        "inputs": inputs,
        "outputs": outputs,
        "states": states,
        "constants": constants,
        "streamable": True,
    }
    if layout is not None and layout.chunk is not None:
        contract["format"] = "rnnzoo.contract/2"
        contract["chunk"] = layout.chunk
        tried = ", ".join(map(str, LENGTHS))
        guessed.append(
            f"chunk {layout.chunk}: of the lengths {tried}, the graph ran at {layout.lengths_ok}"
        )
        check.append(
            f"chunk {layout.chunk}: picked from the lengths that ran {layout.lengths_ok}; set the "
            "length the model was trained on"
        )
    if not states:
        check.append("no state pairs found: a stateless graph, or states named unusually")
    check += [
        f"state pairs {[(s['input'], s['output']) for s in states]}: each output must carry its "
        "input to the next call"
        if states
        else "",
        "task: 'generic' (tensors in and out); classify/forecast/tag/lm/seq2seq if it is one",
        "streamable: true unless an output at step t depends on later steps (bidirectional)",
        "context_steps on an input (and format rnnzoo.contract/2) if each chunk needs the end of "
        "the previous one (a graph cannot show it: Silero VAD's own wrapper prepends 64 samples "
        "at 16 kHz); drop_leading_steps on outputs given for those steps too",
        'chunk: {"steps": N} or {"multiple_of": M} if the graph takes only such lengths',
        f"then run `rnnzoo contract check {path}`",
    ]
    return contract, guessed, [c for c in check if c]


def init(path: str | Path, force: bool = False, values: dict[str, Any] | None = None) -> Path:
    path = Path(path)
    if not path.exists():
        raise InvalidArgument(f"{path}: no such file")
    side = sidecar_path(path)
    if side.exists() and not force:
        raise InvalidArgument(f"{side} exists; pass --force to overwrite it")
    contract, guessed, check = guess(path, values)
    try:
        side.write_text(json.dumps(contract, indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        raise InvalidArgument(f"cannot write {side}: {exc.strerror or exc}") from exc
    print(f"wrote {side}")
    print("guessed:")
    for g in guessed:
        print(f"  - {g}")
    print("check:")
    for c in check:
        print(f"  - {c}")
    return side


def check(path: str | Path) -> list[str]:
    """Problems of ``path``'s contract (sidecar or metadata) against its graph; [] if none."""
    from rnnzoo.contract import read_contract
    from rnnzoo.server.runtime.model import ServedModel

    path = Path(path)
    if not path.exists():
        return [f"{path}: no such file"]
    try:
        contract = read_contract(path)
        ServedModel(path, contract, must_run=True)
    except RnnzooError as exc:
        lines = str(exc).splitlines()
        return [ln.strip().removeprefix("- ") for ln in lines[1:]] or lines
    except Exception as exc:  # an unreadable file or graph: said as a problem, not a traceback
        return [f"{path}: cannot be loaded ({type(exc).__name__}: {' '.join(str(exc).split())})"]
    return []


def _values(pairs: list[str]) -> dict[str, Any]:
    """``NAME=VALUE`` pairs; VALUE is JSON (16000, [1, 2]), else the string itself."""
    out = {}
    for p in pairs:
        name, sep, raw = p.partition("=")
        if not sep or not name:
            raise InvalidArgument(f"--set {p!r}: write NAME=VALUE, e.g. --set sr=16000")
        try:
            out[name] = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise InvalidArgument(
                f"--set {p!r}: the value must be a number or a JSON list, e.g. --set sr=16000"
            ) from exc
    return out


def _init_cmd(args) -> int:
    init(args.model, args.force, _values(args.set or []))
    return 0


def _check_cmd(args) -> int:
    problems = check(args.model)
    if problems:
        print(f"{args.model}: {len(problems)} problem(s):")
        for p in problems:
            print(f"  - {p}")
        return 1
    print(f"{args.model}: ok (schema, graph, and a run at batch 1 and 2)")
    return 0


def register(sub) -> None:
    p = sub.add_parser("contract", help="write or check the contract of an ONNX model")
    csub = p.add_subparsers(dest="contract_command", metavar="ACTION", required=True)
    pi = csub.add_parser("init", help="guess a sidecar MODEL.rnnzoo.json from the graph")
    pi.add_argument("model", help="the .onnx file")
    pi.add_argument("--force", action="store_true", help="overwrite an existing sidecar")
    pi.add_argument(
        "--set",
        action="append",
        metavar="NAME=VALUE",
        help="a constant input's value (e.g. sr=16000): written, and used by the probe run",
    )
    pi.set_defaults(func=_init_cmd)
    pc = csub.add_parser("check", help="check the contract against the graph (probe run)")
    pc.add_argument("model", help="the .onnx file")
    pc.set_defaults(func=_check_cmd)
