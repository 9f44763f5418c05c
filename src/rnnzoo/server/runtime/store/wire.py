"""Redis pipelines packed by us: the RESP bytes of a batch's EVALSHA calls built with a few
joins, sent on one pooled connection, the replies read back in order.

Why (issue 23, 64 sessions x 1 step with Redis, cProfile of the server): redis-py's
``Pipeline`` spent ~100 us per step building its commands (``pack_command`` encodes each of a
call's 11 arguments through its ``Encoder`` and splits large values), more than the rest of
the write-through together. A state write's arguments are bytes and small integers: packing
them here is a ``b"".join``. The reply side stays redis-py's (``Connection.read_response``:
its hiredis parser when ``hiredis`` is installed), and so does the connection handling
(pool, AUTH, TLS, timeouts).

``execute`` behaves like ``Pipeline.execute(raise_on_error=False)``: one result per call, a
Redis error reply (``ResponseError``, e.g. ``NoScriptError``) in its place, anything else
(connection lost, timeout) raised. The command is sent once, never retried here.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Sequence
from typing import Any, cast

try:  # the marker redis-py's hiredis reader returns while a reply is incomplete
    from redis._parsers.hiredis import NOT_ENOUGH_DATA as _NOT_ENOUGH_DATA
except ImportError:  # pragma: no cover - another redis-py layout: replies read one by one
    _NOT_ENOUGH_DATA = object()


@functools.cache
def driver_info() -> dict[str, Any]:
    """``driver_info=`` for redis-py's client, made once: redis-py >= 7 otherwise reads its own
    package metadata (``importlib.metadata.version``) for every new connection, ~5 ms each
    (profiled: 64 sessions attaching at once opened 44 connections and spent 230 ms there)."""
    try:
        import redis
        from redis.driver_info import DriverInfo
    except ImportError:  # an older redis-py: no such parameter
        return {}
    return {"driver_info": DriverInfo(lib_version=redis.__version__)}


Arg = bytes | str | int | float  # what ``arg`` packs


def arg(value: Arg) -> bytes:
    """One argument as Redis receives it."""
    t = type(value)
    if t is bytes:
        return value  # type: ignore[return-value]
    if t is int:
        return b"%d" % cast(int, value)
    if t is str:
        return value.encode()  # type: ignore[union-attr]
    if t is float:
        return repr(value).encode()
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    raise TypeError(f"a Redis argument must be bytes, str, int or float, not {t.__name__}")


def command(args: list[bytes]) -> bytes:
    """One command in RESP: an array of bulk strings."""
    return b"*%d\r\n" % len(args) + b"".join([b"$%d\r\n%b\r\n" % (len(a), a) for a in args])


def bulk(value: bytes) -> bytes:
    """One bytes argument as a RESP bulk string."""
    return b"$%d\r\n%b\r\n" % (len(value), value)


def bulk_int(value: int) -> bytes:
    """One integer argument as a RESP bulk string."""
    digits = b"%d" % value
    return b"$%d\r\n%b\r\n" % (len(digits), digits)


@functools.lru_cache(maxsize=64)
def evalsha_head(sha: str, nargs: int, nkeys: int) -> bytes:
    """The array header and ``EVALSHA sha numkeys`` of a call with ``nargs`` more items."""
    three = command([b"EVALSHA", sha.encode(), b"%d" % nkeys])
    return b"*%d\r\n" % (nargs + 3) + three.split(b"\r\n", 1)[1]


def evalsha(sha: str, keys: Sequence[Arg], args: Sequence[Arg]) -> bytes:
    """``EVALSHA sha numkeys keys... args...`` in RESP."""
    items = [arg(a) for a in keys]
    items += [arg(a) for a in args]
    return evalsha_head(sha, len(items), len(keys)) + b"".join(
        [b"$%d\r\n%b\r\n" % (len(a), a) for a in items]
    )


async def execute(client: Any, packed: list[bytes]) -> list[Any]:
    """Send ``packed`` commands (from ``command``/``evalsha``) in one write on one pooled
    connection of redis-py's asyncio ``client``; their replies, in order."""
    if not packed:
        return []
    pool = client.connection_pool
    conn = await pool.get_connection()
    try:
        await conn.send_packed_command(packed, check_health=False)  # one writelines
        parser = conn._parser
        if type(parser).__name__ == "_AsyncHiredisParser":
            return await _read_hiredis(conn, parser, len(packed))
        return await _read_each(conn, len(packed))
    except BaseException:
        # replies may be left unread (a timeout, a cancellation): the connection is unusable
        await conn.disconnect()
        raise
    finally:
        await pool.release(conn)


async def _read_each(conn: Any, n: int) -> list[Any]:
    from redis.exceptions import ResponseError

    out: list[Any] = []
    for _ in range(n):
        try:
            out.append(await conn.read_response())
        except ResponseError as exc:  # an error reply: the others still come
            out.append(exc)
    return out


async def _read_hiredis(conn: Any, parser: Any, n: int) -> list[Any]:
    """The ``n`` replies straight from redis-py's hiredis reader, read off the socket in as
    few reads as they arrive in: redis-py's ``read_response`` costs ~6 us per reply in its
    own bookkeeping (a timeout context and push handling per call). Error replies come back
    as redis-py's exception instances (its ``parse_error``: NoScriptError included)."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    reader = parser._reader
    out: list[Any] = []
    gets = reader.gets
    async with asyncio.timeout(conn.socket_timeout):
        while len(out) < n:
            r = gets()
            if r is _NOT_ENOUGH_DATA:
                await parser.read_from_socket()
                continue
            if isinstance(r, RedisConnectionError):
                raise r
            out.append(r)
    return out
