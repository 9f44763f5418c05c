"""The runtime's options (every limit checked before compute: docs/limits.md) and the results
its stepping and inference hand to the transport."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

from rnnzoo.errors import InvalidArgument


@dataclass
class RuntimeOptions:
    intra_op_threads: int = 1  # ORT: sequential, no spinning (see model.py)
    inter_op_threads: int = 1
    max_batch: int = 64
    max_delay_ms: float = 1.0  # wait for attached streams up to this long; 0 = no wait
    max_sessions: int = 10_000
    on_full: str = "reject"  # or "evict" (least recently used)
    session_ttl_s: float | None = 600.0  # None or 0 disables idle expiry
    max_buffer_steps: int = 10_000  # non-streamable (bidirectional) sessions
    sweep_interval_s: float = 5.0  # how often the sweeper looks for idle sessions
    # Cost limits, checked before compute (docs/limits.md). Over one: ResourceExhausted
    # saying the limit and how to stay under it.
    max_request_steps: int = 100_000  # per Stream chunk, per Infer (batch x time), per prompt
    max_output_bytes: int = 15 << 20  # predicted from the contract; the server caps it to
    # its message size
    max_generate_tokens: int = 4_096
    lease_ttl_s: float = 30.0  # a stream's hold on its session, renewed while it lives
    # Quota: live sessions per client (principal with authentication, else connection);
    # 0 = none.
    max_sessions_per_client: int = 5_000
    # Long jobs (jobs.py): a request of this many steps (batch x time; a bidirectional
    # session's whole prefix) or more runs in the long-job pool, never on the event loop.
    long_job_steps: int = 2_048
    long_workers: int = 0  # threads of the long-job pool; 0 = cpu_count - 1 (at least 1)
    max_long_jobs: int = 64  # admitted at once (running or waiting); beyond: ResourceExhausted
    max_long_jobs_per_client: int = 8
    long_slice_s: float = 0.02  # a streamable long job runs in slices of about this long
    long_nice: int = 10  # the long-job threads' nice value (lower OS priority); 0 = unchanged
    malloc_trim: bool = True  # give freed memory back to the OS after large requests
    # The state store (store/): a directory (embedded SQLite) or a redis:// URL; None = the
    # in-memory store (sessions live in this process only, through the same code path).
    state_store: str | None = None

    def check(self) -> None:
        problems = []
        if self.intra_op_threads < 1 or self.inter_op_threads < 1:
            problems.append("intra_op_threads and inter_op_threads must be >= 1")
        if self.max_batch < 1:
            problems.append(f"max_batch must be >= 1, got {self.max_batch}")
        if self.max_delay_ms < 0:
            problems.append(f"max_delay_ms must be >= 0, got {self.max_delay_ms}")
        if self.max_sessions < 1:
            problems.append(f"max_sessions must be >= 1, got {self.max_sessions}")
        if self.on_full not in ("reject", "evict"):
            problems.append(f"on_full must be 'reject' or 'evict', got {self.on_full!r}")
        if self.session_ttl_s is not None and self.session_ttl_s < 0:
            problems.append(f"session_ttl_s must be >= 0 (or None), got {self.session_ttl_s}")
        for name in (
            "max_buffer_steps",
            "max_request_steps",
            "max_output_bytes",
            "max_generate_tokens",
            "long_job_steps",
            "max_long_jobs",
            "max_long_jobs_per_client",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.long_nice <= 19:
            problems.append(f"long_nice must be in [0, 19], got {self.long_nice}")
        if self.max_sessions_per_client < 0 or self.long_workers < 0:
            problems.append("max_sessions_per_client and long_workers must be >= 0")
        if not self.long_slice_s > 0:
            problems.append(f"long_slice_s must be > 0, got {self.long_slice_s}")
        if not self.lease_ttl_s > 0:
            problems.append(f"lease_ttl_s must be > 0, got {self.lease_ttl_s}")
        if problems:
            raise InvalidArgument("bad runtime options: " + "; ".join(problems))


@dataclass(slots=True)
class StepResult:
    """What a step computed, protocol-neutral: the replay record kept for a retry of its
    position, from which each RPC (Stream, Infer(advance), KServe) encodes its own response.
    Not frozen: a frozen dataclass's __init__ sets each field through object.__setattr__, and
    one is made on every step; nothing changes one after its transaction."""

    outputs: dict[str, np.ndarray]  # batch-free, (T, ...)
    start: int  # index in the session's sequence of the first returned step
    steps_total: int
    revised: bool  # True: outputs re-cover the whole prefix (non-streamable models)
    # True: this position was applied before; this is its kept result again (nothing was
    # computed and nothing will be committed)
    replayed: bool = False
    # ``await persist()`` before sending the response: fences the step and writes the new
    # state and this result through the state store (the transaction's ``persist``)
    persist: Callable[[], Awaitable[None]] | None = field(default=None, compare=False)
