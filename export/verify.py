"""Parity: ONNX Runtime against PyTorch on the same random inputs and non-zero states.

For every T in ``TIMES`` and B in ``BATCHES`` (skipping only cases whose estimated memory
exceeds ``max_bytes``, and saying so) both runtimes get the same random input and random
non-zero initial states; every output and every final state is compared. Streamable graphs
are also fed chunk by chunk (sizes 1, 7 and random), carrying the state between ORT calls,
and compared with the whole-sequence PyTorch run. All failures are collected, each with its
max difference, before the verdict (like optimum's validation).

A case passes when ``|ort - torch| <= atol + rtol * |torch|`` elementwise, by default
``atol=1e-5, rtol=1e-6``. The small relative term is there for LSTM cell states, which are not
bounded: a trained 2-layer LSTM's ``cn`` reached |31| in a T=64 run, where one float32 ulp is
1.9e-6, and ORT and PyTorch differed by 1.5e-5 (8 ulp) while every bounded tensor stayed under
5e-6. ``max_rel`` reports ``max |ort - torch| / (|torch| + atol)``.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rnnzoo.contract import Contract, read_contract
from rnnzoo.errors import FailedPrecondition, InvalidArgument
from rnnzoo.models.rnn import RecurrentNet

TIMES = (1, 2, 7, 64, 1000, 10000)
BATCHES = (1, 3, 32)
ATOL = 1e-5  # float32 default tolerance (see the module docstring)
RTOL = 1e-6
# Over thousands of steps a trained net that integrates its input (the adding-problem GRU)
# drifts in float32: PyTorch and ORT then differ by more than ATOL (9e-5 at T=10000) while
# both are float32-accurate. Such a case still passes when ORT is no further from the same net
# run in float64 than DRIFT_FACTOR x PyTorch's own float32 error (+ ATOL): the runtimes agree up
# to float32 rounding. The report shows both errors, so nothing is hidden.
DRIFT_FACTOR = 4.0
# Where PyTorch float32 itself is this far from float64, the net is chaotic on that input (the
# num2words encoder on 1000 random digits: both runtimes end up O(1) from float64, only rounding
# differs), and no float32 comparison can tell a correct export from a wrong one. Such a case
# passes as "ill-conditioned"; the verdict then rests on the cases float32 resolves: every
# tensor must pass at least one case outright (T=1, 2, 7 always do for a correct export).
ILL_CONDITIONED = 1e-3
STREAM_T, STREAM_B = 1000, 3
MAX_BYTES = 8 << 30  # per case, both runtimes together (a deliberately high estimate)


@dataclass
class Case:
    graph: str  # the contract name
    mode: str  # "whole" or "stream/<chunking>"
    batch: int
    time: int
    tensor: str  # output or state name
    max_abs: float
    max_rel: float
    ok: bool
    # Set only where the tolerance failed and float64 PyTorch was consulted (see DRIFT_FACTOR):
    ort_vs_exact: float | None = None
    torch_vs_exact: float | None = None

    @property
    def outright(self) -> bool:
        """Passed on the tolerance alone, without the float64 reference."""
        return self.ok and self.ort_vs_exact is None


@dataclass
class Report:
    cases: list[Case] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failures(self) -> list[Case]:
        return [c for c in self.cases if not c.ok]

    @property
    def unresolved(self) -> list[str]:
        """``graph/tensor`` names that no case passed outright (float64 help only)."""
        tensors = {(c.graph, c.tensor) for c in self.cases}
        outright = {(c.graph, c.tensor) for c in self.cases if c.outright}
        return sorted(f"{g}/{t}" for g, t in tensors - outright)

    @property
    def ok(self) -> bool:
        return bool(self.cases) and not self.failures and not self.unresolved

    def max_abs(self, mode_prefix: str = "") -> float | None:
        """Worst abs error over the cases whose mode starts with ``mode_prefix`` (None: none)."""
        vals = [c.max_abs for c in self.cases if c.mode.startswith(mode_prefix)]
        return max(vals) if vals else None

    def worst(self) -> dict[str, float]:
        """Max abs error per tensor over every case (``graph/tensor`` when several graphs)."""
        several = len({c.graph for c in self.cases}) > 1
        out: dict[str, float] = {}
        for c in self.cases:
            key = f"{c.graph}/{c.tensor}" if several else c.tensor
            out[key] = max(out.get(key, 0.0), c.max_abs)
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        d["failures"] = [asdict(c) for c in self.failures]
        d["unresolved"] = self.unresolved
        d["max_abs_by_tensor"] = self.worst()
        return d

    def summary(self) -> str:
        lines = [
            f"{len(self.cases)} comparisons, {len(self.failures)} failing, "
            f"{self.seconds:.1f}s; max abs error per tensor: "
            + ", ".join(f"{k}={v:.2e}" for k, v in self.worst().items())
        ]
        lines += [f"skipped: {s}" for s in self.skipped]
        lines += [f"note: {s}" for s in self.notes]
        for c in self.cases:
            if c.ok and not c.outright:
                kind = "ill-conditioned" if c.torch_vs_exact > ILL_CONDITIONED else "float32 drift"
                lines.append(
                    f"{kind} {c.graph} {c.mode} B={c.batch} T={c.time} {c.tensor}: "
                    f"|ort-torch| {c.max_abs:.2e} > tolerance, but vs float64 ORT {c.ort_vs_exact:.2e}"
                    f" and PyTorch {c.torch_vs_exact:.2e}: accepted"
                )
        lines += [f"FAIL {u}: no case passed on the tolerance alone" for u in self.unresolved]
        for c in self.failures:
            lines.append(
                f"FAIL {c.graph} {c.mode} B={c.batch} T={c.time} {c.tensor}: "
                f"max abs {c.max_abs:.3e}, max rel {c.max_rel:.3e}"
            )
        return "\n".join(lines)


def make_session(path: str | Path):
    """An ORT CPU session configured as the server runs it (one thread, no spinning)."""
    import onnxruntime as ort

    from rnnzoo.server.runtime.model import session_options

    try:
        return ort.InferenceSession(
            str(path), session_options(1, 1), providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph classes
        raise InvalidArgument(
            f"{path}: ONNX Runtime cannot load it ({type(exc).__name__}: {exc}); "
            "re-export it with `rnnzoo export`"
        ) from None


def compare(
    ort_out: np.ndarray, ref: np.ndarray, atol: float, rtol: float
) -> tuple[float, float, bool]:
    """(max abs, max rel, passes). Non-finite values pass only where both sides agree."""
    if ort_out.shape != ref.shape:
        return float("inf"), float("inf"), False
    diff = np.abs(ort_out.astype(np.float64) - ref.astype(np.float64))
    both_nan = np.isnan(ort_out) & np.isnan(ref)
    same_inf = np.isinf(ref) & (ort_out == ref)
    diff = np.where(both_nan | same_inf, 0.0, diff)
    diff = np.nan_to_num(diff, nan=np.inf)
    scale = np.abs(np.nan_to_num(ref.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0))
    ok = bool(np.all(diff <= atol + rtol * scale))
    max_abs = float(diff.max()) if diff.size else 0.0
    max_rel = float((diff / (scale + atol)).max()) if diff.size else 0.0
    return max_abs, max_rel, ok


def _random_case(net: RecurrentNet, B: int, T: int, gen: torch.Generator):
    cfg = net.cfg
    if cfg.vocab_size is not None:
        x = torch.randint(0, cfg.vocab_size, (B, T), generator=gen, dtype=torch.int64)
    else:
        x = torch.randn(B, T, cfg.input_size, generator=gen)
    shape = (cfg.num_layers * cfg.num_directions, B, cfg.hidden_size)
    h = torch.rand(shape, generator=gen) * 2 - 1  # h lives in (-1, 1) for tanh-bounded cells
    state = [h]
    if cfg.is_lstm:
        state.append(torch.randn(shape, generator=gen))  # c is unbounded
    return x, tuple(state)


def _estimate_bytes(net: RecurrentNet, B: int, T: int) -> int:
    cfg = net.cfg
    feats = cfg.input_size if cfg.vocab_size is None else cfg.embed_size
    out = cfg.output_size or cfg.num_directions * cfg.hidden_size
    gates = 4 if cfg.is_lstm else 3
    per_step = feats + out + cfg.num_directions * cfg.hidden_size * (2 * cfg.num_layers + gates)
    return 2 * 4 * B * T * per_step  # two runtimes, float32


def _feeds(contract: Contract, x: torch.Tensor, state) -> dict[str, np.ndarray]:
    feeds = {contract.inputs[0].name: x.numpy()}
    for spec, s in zip(contract.states, state, strict=True):
        feeds[spec.input] = np.ascontiguousarray(s.numpy())
    return feeds


def _chunkings(T: int, gen: torch.Generator) -> dict[str, list[int]]:
    sizes: dict[str, list[int]] = {"chunk1": [1] * T}
    sizes["chunk7"] = [7] * (T // 7) + ([T % 7] if T % 7 else [])
    rand, left = [], T
    while left:
        n = min(left, int(torch.randint(1, 65, (1,), generator=gen)))
        rand.append(n)
        left -= n
    sizes["random"] = rand
    return sizes


def verify_net(
    net: RecurrentNet,
    onnx_path: str | Path,
    *,
    contract: Contract | None = None,
    times: tuple[int, ...] = TIMES,
    batches: tuple[int, ...] = BATCHES,
    stream: tuple[int, int] | None = (STREAM_T, STREAM_B),
    atol: float = ATOL,
    rtol: float = RTOL,
    seed: int = 0,
    max_bytes: int = MAX_BYTES,
    report: Report | None = None,
) -> Report:
    """Compare one graph with the RecurrentNet it came from; returns (and extends) a Report."""
    t0 = time.perf_counter()
    report = report if report is not None else Report()
    contract = contract or read_contract(onnx_path)
    sess = make_session(onnx_path)
    net = net.eval()
    gen = torch.Generator().manual_seed(seed)
    names = [t.name for t in contract.outputs] + [s.output for s in contract.states]
    g = contract.name

    net64: list[RecurrentNet] = []  # built on first need: most models never need it

    def exact(x: torch.Tensor, state) -> list[np.ndarray]:
        """The same net, input and state in float64: the reference both runtimes approximate."""
        if not net64:
            net64.append(copy.deepcopy(net).double())
        x64 = x if x.dtype == torch.int64 else x.double()
        with torch.no_grad():
            y, st = net64[0](x64, tuple(s.double() for s in state))
        return [t.numpy() for t in (y, *st)]

    def record(mode, B, T, got, ref, x, state):
        ref64 = None
        for i, (name, a, b) in enumerate(zip(names, got, ref, strict=True)):
            mx, rel, ok = compare(a, b.numpy(), atol, rtol)
            ort_err = torch_err = None
            if not ok and a.shape == tuple(b.shape):
                ref64 = ref64 if ref64 is not None else exact(x, state)
                ort_err = float(np.abs(a.astype(np.float64) - ref64[i]).max())
                torch_err = float(np.abs(b.numpy().astype(np.float64) - ref64[i]).max())
                drift = ort_err <= DRIFT_FACTOR * torch_err + atol
                ok = bool(np.isfinite(ort_err)) and (drift or torch_err > ILL_CONDITIONED)
            report.cases.append(Case(g, mode, B, T, name, mx, rel, ok, ort_err, torch_err))

    for T in times:
        for B in batches:
            need = _estimate_bytes(net, B, T)
            if need > max_bytes:
                report.skipped.append(
                    f"{g} B={B} T={T}: needs ~{need / 2**30:.1f} GiB > {max_bytes / 2**30:.1f} GiB"
                )
                continue
            x, state = _random_case(net, B, T, gen)
            with torch.no_grad():
                y, new_state = net(x, state)
            got = sess.run(names, _feeds(contract, x, state))
            record("whole", B, T, got, [y, *new_state], x, state)
    if stream is not None:
        if not contract.streamable:
            report.notes.append(f"{g}: not streamable (bidirectional): checked whole-sequence only")
        else:
            T, B = stream
            x, state = _random_case(net, B, T, gen)
            with torch.no_grad():
                y, new_state = net(x, state)
            for label, sizes in _chunkings(T, gen).items():
                st = [s.numpy() for s in state]
                ys, pos = [], 0
                for n in sizes:
                    feeds = {contract.inputs[0].name: x[:, pos : pos + n].numpy()}
                    feeds.update({s.input: v for s, v in zip(contract.states, st, strict=True)})
                    out = sess.run(names, feeds)
                    ys.append(out[0])
                    st = out[1:]
                    pos += n
                got = [np.concatenate(ys, axis=1), *st]
                record(f"stream/{label}", B, T, got, [y, *new_state], x, state)
    report.seconds += time.perf_counter() - t0
    return report


# ---- files and checkpoints ---------------------------------------------------------------


def find_checkpoint(onnx_path: Path, contract: Contract) -> Path:
    """The checkpoint the contract records, else ``model.pt`` beside the ONNX file."""
    tried = []
    recorded = contract.source.get("checkpoint")
    if recorded:
        p = Path(recorded)
        for cand in (p, onnx_path.parent / p.name):
            tried.append(str(cand))
            if cand.is_file():
                return cand
    cand = onnx_path.parent / "model.pt"
    tried.append(str(cand))
    if cand.is_file():
        return cand
    raise FailedPrecondition(
        f"{onnx_path}: cannot find its checkpoint (tried {', '.join(tried)}); "
        "pass it with --checkpoint"
    )


def check_checkpoint_matches(contract: Contract, ckpt_path: Path, origin: Path) -> str:
    from rnnzoo.export.contract_builder import sha256_file

    sha = sha256_file(ckpt_path)
    want = contract.source.get("checkpoint_sha256")
    if not want:
        raise FailedPrecondition(
            f"{origin}: its contract records no checkpoint hash, so it cannot be checked "
            f"against {ckpt_path}; re-export it with `rnnzoo export {ckpt_path}`"
        )
    if sha != want:
        raise FailedPrecondition(
            f"{origin} was exported from a checkpoint with sha256 {want[:12]}..., but "
            f"{ckpt_path} has sha256 {sha[:12]}...: pass the checkpoint it came from, or "
            f"re-export with `rnnzoo export {ckpt_path} --out {origin}`"
        )
    return sha


def graph_files(onnx_path: Path, contract: Contract) -> list[tuple[Path, Contract]]:
    """The graph itself, plus its seq2seq partner when it is one half of a pair."""
    files = [(onnx_path, contract)]
    if contract.role in ("encoder", "decoder"):
        other = "decoder" if contract.role == "encoder" else "encoder"
        sib = onnx_path.with_name(onnx_path.name.replace(f".{contract.role}.", f".{other}."))
        if sib != onnx_path and sib.is_file():
            files.append((sib, read_contract(sib)))
        else:
            raise FailedPrecondition(
                f"{onnx_path} is the {contract.role} of {contract.group!r}; its {other} "
                f"{sib.name} is missing next to it: export both with `rnnzoo export`"
            )
    return files


def verify_file(
    onnx_path: str | Path, checkpoint: str | Path | None = None, **kw: Any
) -> tuple[Report, list[Path]]:
    """Verify an exported file (both halves for seq2seq) against its checkpoint."""
    from rnnzoo.export.source import load

    onnx_path = Path(onnx_path)
    contract = read_contract(onnx_path)  # clear error for a missing/truncated/non-ONNX file
    ckpt_path = Path(checkpoint) if checkpoint else find_checkpoint(onnx_path, contract)
    files = graph_files(onnx_path, contract)
    for path, c in files:
        check_checkpoint_matches(c, ckpt_path, path)
    model, _ = load(ckpt_path)
    report = Report()
    for path, c in files:
        net = getattr(model, c.role) if c.role in ("encoder", "decoder") else model
        if not isinstance(net, RecurrentNet):
            raise FailedPrecondition(
                f"{path}: role {c.role!r} does not match checkpoint {ckpt_path}"
            )
        verify_net(net, path, contract=c, report=report, **kw)
    return report, [p for p, _ in files]


def report_json(report: Report) -> str:
    return json.dumps(report.to_dict(), indent=2, sort_keys=True, default=float)
