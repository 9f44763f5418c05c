"""The served models as the session core sees them: look-ups that say why a model is not
there, and the cost limits checked before anything runs (docs/limits.md)."""

from __future__ import annotations

from rnnzoo.errors import FailedPrecondition, ResourceExhausted

from .memory import LARGE_STEPS, Trimmer
from .model import ServedModel
from .options import RuntimeOptions
from .redact import clip
from .repository import ModelRepository, ServedEntry


class Catalog:
    def __init__(self, repo: ModelRepository, options: RuntimeOptions, trimmer: Trimmer) -> None:
        self.repo = repo
        self.options = options
        self.trimmer = trimmer
        # the per-response output limit: the options', or lower where the transport's message
        # size is (Runtime.cap_output_bytes)
        self.max_output_bytes = options.max_output_bytes

    def entry(self, name: str) -> ServedEntry:
        """A model's newest ready version, or a version's key ``NAME@VERSION`` (a session's);
        the repository's error says why not (unknown, failed, retired, drained)."""
        return self.repo.get(name)

    def single(self, name: str, what: str) -> tuple[ServedEntry, ServedModel]:
        """A single-graph model's entry and graph; FailedPrecondition for a seq2seq pair."""
        entry = self.entry(name)
        if entry.is_seq2seq:
            raise FailedPrecondition(
                f"model {clip(name)!r} is a seq2seq encoder/decoder pair; {what} serves single-graph "
                "models: use generate for it"
            )
        return entry, entry.graphs["model"]

    def check_steps(self, n: int, what: str) -> None:
        """``what`` (e.g. "this chunk") has ``n`` steps: refuse it over max_request_steps."""
        limit = self.options.max_request_steps
        if n >= LARGE_STEPS:  # a big request message was decoded, allowed or not
            self.trimmer.soon()
        if n > limit:
            raise ResourceExhausted(
                f"{what} has {n} steps, over this server's limit of {limit} steps per request "
                f"(max_request_steps); send at most {limit} steps per request (split long "
                "sequences into chunks and stream them through a session)"
            )

    def check_output(self, graph: ServedModel, batch: int, steps: int, what: str) -> None:
        """Refuse a call whose outputs (predicted from the contract) would exceed
        max_output_bytes, before anything runs."""
        limit = self.max_output_bytes
        size = graph.output_bytes(batch, steps)
        if size > limit:
            per_step = max(1, graph.output_bytes(batch, 1) - graph.output_bytes(batch, 0))
            fit = max(0, (limit - graph.output_bytes(batch, 0)) // per_step)
            raise ResourceExhausted(
                f"{what} would return {size} bytes of outputs ({batch} sequence(s) x {steps} "
                f"steps of model {graph.contract.name!r}), over this server's limit of "
                f"{limit} bytes per response (max_output_bytes); send at most {fit} steps "
                f"per request{'' if batch == 1 else ' at this batch size'}"
            )
