"""``verify_net``/``verify_file``: a zoo graph (or a seq2seq pair) against its checkpoint.

The rule itself lives in ``rnnzoo.export.parity`` (per-step, short and conditioned long cases;
see its docstring). A ``RecurrentNet`` graph was exported from ``FlatNet(net)`` by
``export_module``'s path, so it is verified by ``verify_module`` on the same wrapper; this
module adds what checkpoints need: finding them, checking their hash, and both seq2seq halves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rnnzoo.contract import Contract, read_contract
from rnnzoo.errors import FailedPrecondition
from rnnzoo.export.onnx_export import FlatNet
from rnnzoo.export.parity import (
    ATOL,
    BATCHES,
    RTOL,
    STREAM_B,
    STREAM_T,
    TIMES,
    Case,
    Report,
    compare,
    make_session,
    report_json,
)
from rnnzoo.models.rnn import RecurrentNet

__all__ = [
    "ATOL",
    "BATCHES",
    "RTOL",
    "TIMES",
    "Case",
    "Report",
    "compare",
    "make_session",
    "report_json",
    "verify_file",
    "verify_net",
]


def verify_net(
    net: RecurrentNet,
    onnx_path: str | Path,
    *,
    contract: Contract | None = None,
    times: tuple[int, ...] = TIMES,
    batches: tuple[int, ...] = BATCHES,
    stream: tuple[int, int] | None = (STREAM_T, STREAM_B),
    report: Report | None = None,
    **kw: Any,
) -> Report:
    """Compare one graph with the RecurrentNet it came from; returns (and extends) a Report.

    The zoo's graphs are ``export_module`` graphs of ``FlatNet(net)``: this is
    ``verify_module`` on it (the same eager wrapper, sampler and rule).
    """
    from rnnzoo.export.module_verify import verify_module

    return verify_module(
        FlatNet(net.eval()),
        onnx_path,
        contract=contract,
        times=times,
        batches=batches,
        stream=stream,
        report=report,
        **kw,
    )


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
    from rnnzoo.parity_record import sha256_file

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
