"""Who may call, and how often: one policy in front of every service and protocol.

``Guard`` is applied to every RPC the server answers (rnnzoo.v1, KServe v2, reflection,
anything added later), except the health service (load balancers probe it without
credentials), by the server's one interceptor (``interceptors.py``). Before the servicer
runs it:

1. authenticates the call. With a token table (``--auth-tokens FILE``) the call must carry
   ``authorization: Bearer <token>``; the token is looked up by comparing its SHA-256 with
   every entry's using ``hmac.compare_digest``, always over the whole table, so neither the
   time taken nor an early exit tells which entry (or how much of one) matched. Without
   tokens but with mTLS (``--tls-client-ca``), the principal is the client certificate's
   common name. Missing or unknown token: UNAUTHENTICATED saying how to pass one. Failed
   authentications are rate limited per peer address, and so are their log lines
   (``auth_failures.py``);
2. sets the call's ``Caller`` (``rnnzoo.server.runtime.caller``): the principal, and the key
   quotas and fair scheduling count by (the principal, or the connection's peer address
   without authentication). Session ownership and the session quota are enforced in the
   runtime from it, so every servicer gets them;
3. charges the caller's request-rate quota (``RateQuota``, a token bucket per key; a Stream
   pays once per message through ``charge``): over it, RESOURCE_EXHAUSTED saying the quota
   and when to retry.

With a state store (``--state-store``), both quotas are counted there, so N server
processes sharing it (``--workers``, replicas) do not multiply them: the session quota in the
store's create (``store.py``), the request rate through ``RateQuota.share``.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import json
import logging
import math
import re
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rnnzoo.errors import InvalidArgument, ResourceExhausted, Unauthenticated
from rnnzoo.server.runtime.caller import CALLER, Caller

from .auth_failures import AuthFailures
from .logs import call_fields, log

if TYPE_CHECKING:
    from rnnzoo.server.runtime.store.api import QuotaStore

LOG = logging.getLogger("rnnzoo.auth")
EXEMPT = ("/grpc.health.v1.Health/",)
AUTH_KEY = "authorization"
PRINCIPAL_RE = re.compile(r"^[A-Za-z0-9._@+=-]{1,64}$")
MIN_TOKEN_CHARS = 16
HOW = (
    "send the metadata 'authorization: Bearer <token>' with every call (rnnzoo: "
    "Client(target, token=...), or --token-file / RNNZOO_TOKEN for the CLI)"
)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


class TokenTable:
    """principal -> bearer token, held as SHA-256 digests."""

    def __init__(self, entries: dict[str, str]) -> None:
        if not entries:
            raise InvalidArgument("the token table is empty; add lines 'principal:token'")
        seen: dict[bytes, str] = {}
        self._entries: list[tuple[str, bytes]] = []
        for principal, token in entries.items():
            if not PRINCIPAL_RE.match(principal):
                raise InvalidArgument(
                    f"principal {principal[:64]!r}: use 1-64 characters of letters, digits "
                    "and ._@+=-"
                )
            if len(token) < MIN_TOKEN_CHARS or token != token.strip():
                raise InvalidArgument(
                    f"the token of principal {principal!r} is shorter than {MIN_TOKEN_CHARS} "
                    "characters or has surrounding spaces; make one with: python -c "
                    "'import secrets; print(secrets.token_urlsafe(32))'"
                )
            d = _digest(token)
            if d in seen:
                raise InvalidArgument(
                    f"principals {seen[d]!r} and {principal!r} share a token; give each its own"
                )
            seen[d] = principal
            self._entries.append((principal, d))

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def principals(self) -> list[str]:
        return [p for p, _ in self._entries]

    @classmethod
    def from_file(cls, path: str | Path) -> TokenTable:
        """Lines ``principal:token`` (``#`` comments, blank lines ignored), or JSON: an object
        ``{"principal": "token", ...}`` or a list of ``{"principal": ..., "token": ...}``."""
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as exc:
            raise InvalidArgument(f"cannot read the token file {p}: {exc.strerror}") from None
        try:
            mode = p.stat().st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                log(
                    LOG,
                    "the token file is readable by other users; chmod 600 it",
                    logging.WARNING,
                    file=str(p),
                )
        except OSError:
            pass
        entries: dict[str, str] = {}
        stripped = text.lstrip()
        if stripped.startswith(("{", "[")):
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise InvalidArgument(f"{p}: not valid JSON ({exc})") from None
            items = (
                data.items()
                if isinstance(data, dict)
                else [(d.get("principal"), d.get("token")) for d in data if isinstance(d, dict)]
            )
            for principal, token in items:
                if not isinstance(principal, str) or not isinstance(token, str):
                    raise InvalidArgument(f"{p}: every entry needs a string principal and token")
                if principal in entries:
                    raise InvalidArgument(f"{p}: principal {principal!r} appears twice")
                entries[principal] = token
        else:
            for n, line in enumerate(text.splitlines(), 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                principal, sep, token = line.partition(":")
                if not sep:
                    raise InvalidArgument(f"{p}:{n}: expected 'principal:token'")
                principal = principal.strip()
                if principal in entries:
                    raise InvalidArgument(f"{p}:{n}: principal {principal!r} appears twice")
                entries[principal] = token.strip()
        return cls(entries)

    def lookup(self, token: str) -> str | None:
        """The principal whose token this is, or None. Constant time in which entry matched:
        every entry is compared, digests of equal length, no early exit."""
        d = _digest(token)
        found = None
        for principal, want in self._entries:
            if hmac.compare_digest(d, want):
                found = principal
        return found


def bearer(metadata) -> str | None:
    """The token of an ``authorization: Bearer <token>`` entry, or None."""
    for key, value in metadata or ():
        if key == AUTH_KEY:
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return ""
    return None


class RateQuota:
    """A token bucket per caller key: ``rate`` requests/s, bursts of ``burst``.

    In this process by default. ``share(store)`` moves the buckets into the state store, so
    that N server processes sharing it (``--workers``, replicas) do not multiply the quota:
    each process then takes tokens from the shared bucket in grants of ``grant`` (50 ms of
    the rate, at most a quarter of a burst, at least 1), one store round trip per grant, and
    spends them locally. At most N grants are outstanding beyond the bucket, and over time
    the rate is the bucket's: tokens a process took and did not spend are lost to it, which
    only makes the quota stricter.
    """

    MAX_KEYS = 100_000

    def __init__(self, rate: float, burst: float | None = None, clock=time.monotonic) -> None:
        if not rate > 0 or not math.isfinite(rate):
            raise InvalidArgument(f"requests per second must be > 0, got {rate}")
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, 2 * rate)
        if self.burst < 1:
            raise InvalidArgument(f"burst must be >= 1, got {self.burst}")
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)
        self.refused = 0
        self.store: QuotaStore | None = None  # a StateStore once shared
        self.grant = max(1, min(int(self.rate / 20), int(self.burst / 4)))
        self._grants: dict[str, float] = {}  # shared: key -> tokens taken, not yet spent

    def share(self, store: QuotaStore) -> None:
        """Keep the buckets in ``store`` (a StateStore), shared with every process using it."""
        self.store = store

    def take(self, caller: Caller, n: float = 1.0):
        """Charge ``caller`` ``n`` requests: None, or ResourceExhausted over the quota. Shared,
        when this process's grant has run out, an awaitable that asks the store (await it)."""
        if self.store is not None:
            left = self._grants.get(caller.key, 0.0)
            if left >= n:
                self._grants[caller.key] = left - n
                return None
            return self._refill(caller, n)
        now = self.clock()
        tokens, at = self._buckets.get(caller.key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if tokens < n:
            self._buckets[caller.key] = (tokens, now)
            raise self._over(caller, (n - tokens) / self.rate)
        self._buckets[caller.key] = (tokens - n, now)
        if len(self._buckets) > self.MAX_KEYS:
            self._prune(now)
        return None

    async def _refill(self, caller: Caller, n: float) -> None:
        want = max(self.grant, math.ceil(n))
        assert self.store is not None  # take() refills only once shared
        got = await self.store.take_tokens(caller.key, want, self.rate, self.burst)
        left = self._grants.get(caller.key, 0.0) + got  # re-read: other calls refill too
        if left < n:
            self._grants[caller.key] = left
            raise self._over(caller, (n - left) / self.rate)
        self._grants[caller.key] = left - n
        if len(self._grants) > self.MAX_KEYS:
            for k in [k for k, v in self._grants.items() if v < 1]:
                del self._grants[k]

    def _over(self, caller: Caller, wait_s: float) -> ResourceExhausted:
        self.refused += 1
        shared = " across the servers sharing the state store" if self.store is not None else ""
        return ResourceExhausted(
            f"{caller.describe()} is over its quota of {self.rate:g} requests/s{shared} "
            f"(requests_per_s, bursts of {self.burst:g}; a Stream message counts as a "
            f"request); retry in {max(wait_s, 1 / self.rate):.3g} s, and send at most "
            f"{self.rate:g} requests/s"
        )

    def _prune(self, now: float) -> None:
        """Forget buckets that have refilled (they read the same as a new one)."""
        full = [
            k for k, (t, at) in self._buckets.items() if t + (now - at) * self.rate >= self.burst
        ]
        for k in full:
            del self._buckets[k]


_QUOTA: contextvars.ContextVar[tuple[RateQuota, Caller] | None] = contextvars.ContextVar(
    "rnnzoo_rate_quota", default=None
)


def charge(n: float = 1.0):
    """Charge the current call's caller ``n`` more requests (a Stream's later messages).
    Returns None, or an awaitable the caller must await (a shared quota asking its store);
    raises ResourceExhausted over the quota."""
    q = _QUOTA.get()
    if q is not None:
        return q[0].take(q[1], n)
    return None


def _cert_name(context) -> str | None:
    """The client certificate's common name (mTLS), or None."""
    try:
        ctx = context.auth_context() or {}
    except Exception:  # no auth context on an insecure call
        return None
    for key in ("x509_common_name", "x509_subject_alternative_name"):
        vals = ctx.get(key)
        if vals:
            v = vals[0]
            return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
    return None


@dataclass(frozen=True, slots=True)
class Decision:
    """What the guard decided for one call from its metadata, before the call runs."""

    method: str
    principal: str | None  # the bearer token's principal (None: no token table)
    refusal: str | None  # why the call is refused (UNAUTHENTICATED), or None


class Guard:
    """Authentication, the caller, and the request-rate quota for every RPC (see module).

    A policy, not an interceptor of its own: the server's one interceptor
    (``interceptors.ErrorInterceptor``) asks it for a ``Decision`` per call and runs
    ``enter`` first thing in the call, so refused calls reach nothing else, their errors go
    through the one error->status mapping, and a streamed message resumes one wrapper, not
    two (each wrapper layer cost ~1 µs per resumption, 3.4 resumptions per message).
    """

    def __init__(
        self,
        tokens: TokenTable | None = None,
        rate: RateQuota | None = None,
        cert_principals: bool = False,
    ) -> None:
        self.tokens = tokens
        self.rate = rate
        self.cert_principals = cert_principals  # mTLS without tokens: principal = cert CN
        self.refused: dict[str, int] = {"UNAUTHENTICATED": 0, "RESOURCE_EXHAUSTED": 0}
        # failed authentications per peer address: as many per second as the request-rate
        # quota allows a caller, at least 10/s, in bursts of at least 100
        self.failures = AuthFailures(max(10.0, rate.rate)) if rate is not None else AuthFailures()

    @property
    def authenticating(self) -> bool:
        return self.tokens is not None or self.cert_principals

    def decide(self, handler_call_details) -> Decision | None:
        """The call's decision from its metadata; None for an exempt method (health)."""
        method = handler_call_details.method
        if method.startswith(EXEMPT):
            return None
        if self.tokens is None:
            return Decision(method, None, None)
        token = bearer(handler_call_details.invocation_metadata)  # once per call
        principal = self.tokens.lookup(token) if token else None
        if principal is not None:
            return Decision(method, principal, None)
        why = (
            "this server requires a bearer token and the call carried none"
            if token is None
            else "the bearer token is not valid (unknown, revoked or mistyped)"
        )
        return Decision(method, None, f"{why}; {HOW}")

    async def enter(self, decision: Decision, context) -> None:
        """First thing in a call: refuse it (Unauthenticated, ResourceExhausted), or set its
        ``Caller`` (and the rate quota that ``charge`` draws on) for the call's task."""
        method, principal, refusal = decision.method, decision.principal, decision.refusal
        if refusal is not None:
            self._unauthenticated(method, context)
            raise Unauthenticated(refusal)
        if principal is None and self.cert_principals:
            principal = _cert_name(context)
            if principal is None:
                self._unauthenticated(method, context)
                raise Unauthenticated(
                    "this server identifies clients by their TLS certificate and this call "
                    "presented none with a common name; connect with a client certificate "
                    "signed by the server's client CA"
                )
        caller = Caller(
            f"principal:{principal}" if principal is not None else f"peer:{context.peer()}",
            principal,
        )
        CALLER.set(caller)  # this call's task only: each RPC runs in its own task
        if self.rate is not None:
            _QUOTA.set((self.rate, caller))
            try:
                wait = self.rate.take(caller)
                if wait is not None:
                    await wait
            except ResourceExhausted:
                self._refuse(method, context, "RESOURCE_EXHAUSTED")
                raise

    def _unauthenticated(self, method: str, context) -> None:
        """A failed authentication: over its peer's budget ResourceExhausted (raised), else
        counted; logged (one line, not two) for the first of its peer in a window."""
        peer = context.peer()
        try:
            self.failures.check(peer)
        except ResourceExhausted:
            self.refused["RESOURCE_EXHAUSTED"] += 1
            self._quiet()
            raise
        self.refused["UNAUTHENTICATED"] += 1
        if self.failures.failed(peer):
            log(
                LOG,
                "refused",
                logging.WARNING,
                rpc=method,
                code="UNAUTHENTICATED",
                peer=peer,
                not_logged_since=self.failures.suppressed(),
            )
        self._quiet()

    @staticmethod
    def _quiet() -> None:
        """No RPC log line for this call: the guard's own line (rate limited) stands for it."""
        fields = call_fields()
        if fields is not None:
            fields["quiet"] = True

    def _refuse(self, method: str, context, code: str) -> None:
        self.refused[code] = self.refused.get(code, 0) + 1
