"""A replica frozen past ``--lease-ttl`` behind nginx, then resumed (issue 21): nginx resets
the streams it left unanswered (no answer and no keepalive ping within grpc_read_timeout),
the clients resend with their positions (their per-step deadline ends a resend nginx sent to
the frozen replica again), the sessions continue on the other replica once their leases run
out, and the zombie's writes, computed before the freeze, are fenced off when it resumes:
every session stands exactly where its client was told, and no acknowledged output is wrong.

Measured, and said in docs/reliability.md: nginx (open source) counts a call left without
response headers as a failure of the replica (max_fails) only once the request is fully
sent, which a Stream's never is; so a new Stream can still be routed to the frozen replica,
and only the client's per-step deadline ends it. Two real ``rnnzoo serve`` replicas sharing a Redis behind a real nginx
built from deploy/nginx-rnnzoo.conf.template (grpc_read_timeout 2 s here instead of 15 s,
replicas pinging idle connections every second: the template's ratio, shorter). Redis, not
the DIR store: a process frozen inside a SQLite transaction holds the file's write lock, and
the other replica's writes then wait for it (up to the 10 s busy timeout; measured here:
every session stalled until the frozen replica resumed); a DIR store is for the processes
of one host that do not freeze alone."""

from __future__ import annotations

import os
import signal
import time

from faults_harness import Load
from scaleout_harness import Nginx, Redis, Serve
from test_faults_redis import ID_RUN, _report

from rnnzoo.client import Client


def test_a_frozen_replica_is_marked_down_and_its_zombie_writes_are_fenced(zoo, tmp_path):
    redis = Redis(tmp_path)
    store = redis.url()
    opts = ("--lease-ttl", "2", "--keepalive-time", "1", "--keepalive-timeout", "1")
    a = Serve(zoo, store, tmp_path, *opts)
    b = Serve(zoo, store, tmp_path, *opts)
    ng = Nginx(
        tmp_path,
        [a.port, b.port],
        server_opts="max_fails=1 fail_timeout=30s",
        edits={"grpc_read_timeout 15s;": "grpc_read_timeout 2s;"},
    )
    try:
        # every session sends positions: a client-side deadline leaves a step's outcome
        # unknown, and only a position lets the resend be answered from the store
        load = Load(ng.target, sessions=8, positionless=0, steps=500, step_timeout=5.0)
        load.start()
        time.sleep(1.5)
        t_freeze = time.monotonic() - load.t0
        os.kill(a.pid, signal.SIGSTOP)
        time.sleep(8.0)  # past the 2 s lease and two of nginx's 2 s read timeouts
        os.kill(a.pid, signal.SIGCONT)
        t_resume = time.monotonic() - load.t0
        load.join(timeout=60)
        assert load.done, load.stuck()
        assert load.wrong() == []
        errors = load.errors()
        assert not any(c == "UNKNOWN" or ID_RUN.search(m) for _, c, m in errors), errors
        # the zombie's writes were fenced: every session stands where its client was told
        with Client(ng.target, timeout=10) as c:
            for s in load.streams:
                assert c.snapshot(s.ids[-1]).steps == len(s.x)
        firsts = [s.first_ok_after(t_freeze) for s in load.streams]
        assert None not in firsts  # every session streamed on after the freeze
        before_resume = sum(f < t_resume for f in firsts)
        _report(
            "replica-frozen",
            fault_s=t_resume - t_freeze,
            errors=len(errors),
            acked=sum(s.acked for s in load.streams),
            all_stepping_after_s=max(firsts) - t_freeze,
            sessions_on_before_resume=before_resume,
        )
    finally:
        for p in (a, b):
            if p.p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
        ng.stop()
        a.stop()
        b.stop()
        redis.stop()
