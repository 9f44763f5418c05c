"""``rnnzoo contract init MODEL.onnx`` and ``rnnzoo contract check MODEL.onnx``.

``init`` reads a graph exported elsewhere and writes ``MODEL.rnnzoo.json`` with its guesses:
- state pairs, by name (``state``->``stateN``, ``h0``->``hn``, ``*_in``->``*_out``, ...) with the
  same dtype and shape, else by equal shapes for tensors whose only symbolic dim is the batch;
- the batch dim: the symbolic dim name most tensors share; a data tensor's time axis: its
  other symbolic dim; a state's batch axis: where its symbolic dim is;
- constants: rank-0 inputs, and inputs without a batch dim, with their dtype and the value
  ``null``, which the server refuses until it is set.
It prints what it guessed and what the user must check. ``check`` validates the contract
(schema, graph, and a probe run at batch 1 and 2) and names each wrong field.

No torch: the serving install runs it (onnx, onnxruntime).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from rnnzoo.contract import CONTRACT_FORMAT, sidecar_path
from rnnzoo.errors import InvalidArgument

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
        dims = []
        for d in t.shape.dim if t.HasField("shape") else []:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            else:
                dims.append(d.dim_param or None)
        out[v.name] = (ONNX_DTYPES.get(t.elem_type, f"onnx-type-{t.elem_type}"), dims)
    return out


def _pair_states(g_in: dict, g_out: dict, batch: str | None) -> list[tuple[str, str, str]]:
    """(input, output, how) for every state pair guessed."""
    pairs, used = [], set()
    for name, (dt, shape) in g_in.items():
        for pat, tmpl in NAME_RULES:
            m = re.match(pat, name)
            if not m:
                continue
            cand = m.expand(tmpl)
            if cand in g_out and cand not in used and g_out[cand] == (dt, shape):
                pairs.append((name, cand, f"name rule {name} -> {cand}, equal shapes"))
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


def _spec(name: str, dt: str, shape: list, batch: str | None) -> tuple[dict, list[str]]:
    """A data tensor's contract entry and what was guessed about it."""
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
    notes = [f"batch_axis={b_axis}", f"time_axis={t_axis}"]
    if len(others) > 1:
        notes.append(f"other symbolic dims {[shape[i] for i in others[1:]]} left symbolic")
    spec = {"name": name, "dtype": dt, "shape": dims, "batch_axis": b_axis, "time_axis": t_axis}
    return spec, notes


def guess(path: str | Path) -> tuple[dict, list[str], list[str]]:
    """(contract dict, what was guessed, what to check) for the graph at ``path``."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    g_in = _tensors(v for v in model.graph.input if v.name not in inits)
    g_out = _tensors(model.graph.output)
    counts = Counter(
        d
        for _, shape in [*g_in.values(), *g_out.values()]
        for d in set(shape)
        if isinstance(d, str)
    )
    batch = counts.most_common(1)[0][0] if counts else None
    guessed = [f"batch dim: {batch!r} (symbolic in {counts.get(batch, 0)} tensors)"]
    check: list[str] = []
    pairs = _pair_states(g_in, g_out, batch)
    states = []
    for si, so, how in pairs:
        dt, shape = g_in[si]
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
    in_states = {p[0] for p in pairs}
    out_states = {p[1] for p in pairs}
    inputs, constants = [], []
    for name, (dt, shape) in g_in.items():
        if name in in_states:
            continue
        if not shape or batch not in shape:
            constants.append({"name": name, "dtype": dt, "value": None})
            guessed.append(f"constant {name} ({dt}, rank {len(shape)}): value null")
            check.append(
                f"constants: set the value of {name!r} ({dt}, shape {shape}; a scalar is fed as "
                "a 0-d tensor): the server refuses the file until it is set"
            )
            continue
        spec, notes = _spec(name, dt, shape, batch)
        inputs.append(spec)
        guessed.append(f"input {name} {shape}: " + ", ".join(notes))
    outputs = []
    for name, (dt, shape) in g_out.items():
        if name in out_states:
            continue
        spec, notes = _spec(name, dt, shape, batch)
        outputs.append(spec)
        guessed.append(f"output {name} {shape}: " + ", ".join(notes))
        if spec["time_axis"] is None:
            check.append(f"output {name!r} has no time axis: given once per chunk?")
    stem = Path(path).name.removesuffix(".onnx")
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
        "the previous one; drop_leading_steps on outputs given for those steps too",
        'chunk: {"steps": N} or {"multiple_of": M} if the graph takes only such lengths',
        f"then run `rnnzoo contract check {path}`",
    ]
    return contract, guessed, [c for c in check if c]


def init(path: str | Path, force: bool = False) -> Path:
    path = Path(path)
    if not path.exists():
        raise InvalidArgument(f"{path}: no such file")
    side = sidecar_path(path)
    if side.exists() and not force:
        raise InvalidArgument(f"{side} exists; pass --force to overwrite it")
    contract, guessed, check = guess(path)
    side.write_text(json.dumps(contract, indent=2) + "\n", encoding="utf-8")
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

    try:
        contract = read_contract(path)
        ServedModel(Path(path), contract, must_run=True)
    except InvalidArgument as exc:
        lines = str(exc).splitlines()
        return [ln.strip().removeprefix("- ") for ln in lines[1:]] or lines
    return []


def _init_cmd(args) -> int:
    init(args.model, args.force)
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
    pi.set_defaults(func=_init_cmd)
    pc = csub.add_parser("check", help="check the contract against the graph (probe run)")
    pc.add_argument("model", help="the .onnx file")
    pc.set_defaults(func=_check_cmd)
