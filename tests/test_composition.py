"""Every serving feature composes with every other (issue 20).

One real ``rnnzoo serve`` per configuration ({no store, DIR, Redis} x {1, 2 workers}; TLS on
one, bearer tokens on another; no store with 2 workers is refused), and many operations
against it: Stream in chunks, Infer(advance), both mixed, position retries of either kind
over either RPC, KServe unary, streamed and mixed sequences through the unmodified
tritonclient (its own venv), a bidirectional session, Generate, snapshot, restore and fork,
reset and close on attached and detached sessions from either worker, sessions moving between
workers, and SIGTERM (and kill -9) with restart mid-session for each session kind. Every
output is compared with onnxruntime run on the model file.
"""

from __future__ import annotations

import json
import queue
import re
import subprocess
import time
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from onnx_fixtures import CHARS, build_rnn, build_zoo
from scaleout_harness import RNNZOO, Proc, Redis, free_port
from test_kserve import _out, _request
from test_kserve_tritonclient import TRITON_PY, triton_python  # noqa: F401  (a fixture)
from test_security import _ca, _leaf

from rnnzoo.proto.inference.v2 import grpc_service_pb2_grpc as kgrpc
from rnnzoo.proto.tensors import from_tensor, to_tensor
from rnnzoo.proto.v1 import rnnzoo_pb2 as pb
from rnnzoo.proto.v1 import rnnzoo_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = Path(__file__).with_name("tritonclient_compose.py")
Code = grpc.StatusCode
EXACT = 1e-5
TOKEN = "c" * 32
T = 12

CONFIGS = {
    "memory-1-tls": {"store": None, "workers": 1, "tls": True},
    "dir-1": {"store": "dir", "workers": 1},
    "dir-2": {"store": "dir", "workers": 2},
    "redis-1-tokens": {"store": "redis", "workers": 1, "tokens": True},
    "redis-2": {"store": "redis", "workers": 2},
}


# ---- the model files and onnxruntime's answers --------------------------------------------------
@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("zoo")
    build_zoo(d)
    build_rnn(d / "sine-rnn.onnx", cell="rnn", input_size=1, output_size=1, seed=21)
    return d


def _ort(path: Path, name: str, x: np.ndarray, out: str = "y") -> np.ndarray:
    """onnxruntime on the model file, batch 1, zero initial states: (T, ...) outputs."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {name: x[None]}
    for i in sess.get_inputs():
        if i.name != name:
            shape = [d if isinstance(d, int) else 1 for d in i.shape]
            feeds[i.name] = np.zeros(shape, np.float32)
    return sess.run([out], feeds)[0][0]


def _x(steps: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(steps, 3)).astype(np.float32)


# ---- one server per configuration -----------------------------------------------------------------
class Served(Proc):
    def __init__(self, zoo: Path, tmp: Path, cfg: dict, store: str | None, port: int = 0):
        self.zoo, self.tmp, self.cfg, self.store = zoo, tmp, cfg, store
        self.port = port or free_port()
        args = [
            *RNNZOO,
            "serve",
            "--model-dir",
            str(zoo),
            "--port",
            str(self.port),
            "--grace",
            "1",
            "--lease-ttl",
            "30",
            # successful unary calls (CreateSession, read by worker_of) log at debug
            "--log-level",
            "debug",
        ]
        if store:
            args += ["--state-store", store]
        if cfg["workers"] > 1:  # successful unary calls are logged at debug: which worker
            args += ["--workers", str(cfg["workers"]), "--log-level", "debug"]
        if cfg.get("tls"):
            args += ["--tls-cert", str(tmp / "server.pem"), "--tls-key", str(tmp / "server.key")]
        if cfg.get("tokens"):
            args += ["--auth-tokens", str(tmp / "tokens")]
        self.mark = 0
        log = tmp / f"serve-{self.port}.log"
        if log.exists():
            self.mark = len(log.read_bytes())
        super().__init__(args, log)
        want = cfg["workers"] if cfg["workers"] > 1 else 0
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            text = self.log.read_bytes()[self.mark :]
            ready = text.count(b'"msg": "worker ready"') >= want
            if re.search(rb"listening on", text) and ready:
                return
            if self.p.poll() is not None:
                raise RuntimeError(f"rnnzoo serve exited: {self.log.read_text()[-3000:]}")
            time.sleep(0.1)
        raise TimeoutError(f"rnnzoo serve did not start: {self.log.read_text()[-3000:]}")

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def restart(self, kill9: bool = False) -> Served:
        if kill9:
            self.kill9()
        else:
            assert self.term(30) == 0, self.log.read_text()[-3000:]
        self.fh.close()
        return Served(self.zoo, self.tmp, self.cfg, self.store, self.port)

    def conn(self) -> Conn:
        creds = None
        if self.cfg.get("tls"):
            creds = grpc.ssl_channel_credentials((self.tmp / "ca.pem").read_bytes())
        md = (("authorization", f"Bearer {TOKEN}"),) if self.cfg.get("tokens") else ()
        return Conn(self.target, creds, md)

    def worker_of(self, sid: str) -> int:
        """The worker that created session ``sid`` (0 with one worker)."""
        if self.cfg["workers"] == 1:
            return 0
        for ln in self.log.read_text().splitlines():
            if ln.startswith("{"):
                rec = json.loads(ln)
                if rec.get("rpc") == "CreateSession" and str(rec.get("session", "")).startswith(
                    sid[:6]
                ):
                    return int(rec["worker"])
        raise AssertionError(f"no CreateSession of {sid[:6]} in the log")

    def triton(self, data: Path, mode: str) -> subprocess.CompletedProcess:
        args = [str(TRITON_PY), str(COMPOSE), self.target, str(data), mode]
        if self.cfg.get("tls"):
            args += ["--ca", str(self.tmp / "ca.pem")]
        if self.cfg.get("tokens"):
            args += ["--token", TOKEN]
        return subprocess.run(args, capture_output=True, text=True, timeout=180)


class Conn:
    """One client connection (its own subchannel: with 2 workers, one worker behind it)."""

    def __init__(self, target: str, creds, md: tuple) -> None:
        opts = [("grpc.use_local_subchannel_pool", 1)]
        if creds is not None:
            self.ch = grpc.secure_channel(target, creds, opts)
        else:
            self.ch = grpc.insecure_channel(target, opts)
        self.v1 = pb_grpc.RnnzooStub(self.ch)
        self.kserve = kgrpc.GRPCInferenceServiceStub(self.ch)
        self.md = md

    def close(self) -> None:
        self.ch.close()

    def create(self, model: str = "gru") -> str:
        return self.v1.CreateSession(
            pb.CreateSessionRequest(model=model), metadata=self.md
        ).session_id

    def stream(self, sid: str, chunks: list[np.ndarray], positions=None) -> list[pb.StreamResponse]:
        reqs = []
        for i, c in enumerate(chunks):
            r = pb.StreamRequest(session_id=sid, request_id=i, inputs={"x": to_tensor(c)})
            if positions is not None:
                r.position = positions[i]
            reqs.append(r)
        return list(self.v1.Stream(iter(reqs), metadata=self.md, timeout=60))

    def advance(self, sid: str, x: np.ndarray, position: int | None = None) -> np.ndarray:
        req = pb.InferRequest(
            model="gru", session_id=sid, advance=True, inputs={"x": to_tensor(x[None])}
        )
        if position is not None:
            req.position = position
        return from_tensor(self.v1.Infer(req, metadata=self.md, timeout=60).outputs["y"])[0]

    def open(self, sid: str) -> OpenStream:
        return OpenStream(self, sid)

    def refused(self, call, *args, code=Code.FAILED_PRECONDITION, match: str = "") -> str:
        with pytest.raises(grpc.RpcError) as info:
            call(*args, metadata=self.md, timeout=30)
        assert info.value.code() == code, info.value.details()
        assert match in info.value.details(), info.value.details()
        return info.value.details()


class OpenStream:
    """A Stream kept open (its session attached) while other calls run."""

    def __init__(self, conn: Conn, sid: str) -> None:
        self.q: queue.Queue = queue.Queue()
        self.sid = sid
        self.call = conn.v1.Stream(iter(self.q.get, None), metadata=conn.md, timeout=120)

    def step(self, x: np.ndarray) -> pb.StreamResponse:
        self.q.put(pb.StreamRequest(session_id=self.sid, inputs={"x": to_tensor(x)}))
        return next(self.call)

    def close(self) -> None:
        self.q.put(None)
        for _ in self.call:
            pass


def _y(resps) -> np.ndarray:
    return np.concatenate([from_tensor(r.outputs["y"]) for r in resps])


def _per_worker(srv: Served, n: int = 12) -> list[Conn]:
    """One connection per worker (connections are spread over the workers by the kernel)."""
    found: dict[int, Conn] = {}
    for _ in range(n):
        c = srv.conn()
        w = srv.worker_of(c.create())
        if w in found:
            c.close()
        else:
            found[w] = c
        if len(found) == srv.cfg["workers"]:
            break
    return [found[w] for w in sorted(found)]


# ---- the test -------------------------------------------------------------------------------------
def test_no_store_with_two_workers_is_refused(zoo):
    r = subprocess.run(
        [*RNNZOO, "serve", "--model-dir", str(zoo), "--port", "0", "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "--state-store" in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_operation_composes_in_this_configuration(
    name,
    zoo,
    tmp_path,
    subtests,
    triton_python,  # noqa: F811
):
    cfg = CONFIGS[name]
    if cfg.get("tls"):
        _ca(tmp_path, "ca")
        _leaf(tmp_path, "server", "ca", "localhost", server=True)
    if cfg.get("tokens"):
        (tmp_path / "tokens").write_text(f"alice:{TOKEN}\n")
        (tmp_path / "tokens").chmod(0o600)
    redis = Redis(tmp_path) if cfg["store"] == "redis" else None
    store = redis.url() if redis else (str(tmp_path / "state") if cfg["store"] else None)
    x = _x(T, 1)
    ref = _ort(zoo / "gru.onnx", "x", x)
    srv = Served(zoo, tmp_path, cfg, store)
    conns: list[Conn] = []
    try:
        conns = _per_worker(srv)
        a, b = conns[0], conns[-1]  # two workers when there are two

        with subtests.test("Stream in chunks"):
            sid = a.create()
            np.testing.assert_allclose(_y(a.stream(sid, [x[:3], x[3:7], x[7:]])), ref, atol=EXACT)

        with subtests.test("Infer(advance) in chunks"):
            sid = a.create()
            got = [a.advance(sid, x[:4]), b.advance(sid, x[4:9]), a.advance(sid, x[9:])]
            np.testing.assert_allclose(np.concatenate(got), ref, atol=EXACT)

        with subtests.test("Stream and Infer(advance) mixed, across workers"):
            sid = a.create()
            got = [_y(b.stream(sid, [x[:3]])), a.advance(sid, x[3:7]), _y(b.stream(sid, [x[7:]]))]
            np.testing.assert_allclose(np.concatenate(got), ref, atol=EXACT)

        with subtests.test("a retried position returns the same outputs over either RPC"):
            sid = a.create()
            first = a.stream(sid, [x[:3]], positions=[0])[0]
            again = b.advance(sid, x[:3], position=0)  # Infer retry of a Stream step
            np.testing.assert_allclose(again, from_tensor(first.outputs["y"]), atol=0)
            mid = a.advance(sid, x[3:7], position=3)
            retry = b.stream(sid, [x[3:7]], positions=[3])[0]  # Stream retry of an Infer step
            assert (retry.session_id, retry.start, retry.steps_total) == (sid, 3, 7)
            np.testing.assert_allclose(from_tensor(retry.outputs["y"]), mid, atol=0)
            same = a.stream(sid, [x[3:7]], positions=[3])[0]  # and over the same RPC
            np.testing.assert_allclose(from_tensor(same.outputs["y"]), mid, atol=0)
            rest = b.stream(sid, [x[7:]], positions=[7])
            np.testing.assert_allclose(
                np.concatenate([from_tensor(first.outputs["y"]), mid, _y(rest)]), ref, atol=EXACT
            )
            a.refused(
                a.v1.Infer,
                pb.InferRequest(
                    model="gru",
                    session_id=sid,
                    advance=True,
                    position=4,
                    inputs={"x": to_tensor(x[None, :1])},
                ),
                match="position",
            )

        with subtests.test("KServe sequences through tritonclient: unary, streamed, mixed"):
            data = tmp_path / "kserve.npz"
            np.savez(data, x=x[None], ref=ref[None], tag=name)
            r = srv.triton(data, "all")
            assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]

        with subtests.test("a KServe sequence moves between workers, unary and streamed"):
            seq = f"{name}-moves"
            xb = x[None]

            def unary(c: Conn, part: np.ndarray, **flags) -> np.ndarray:
                return _out(c.kserve.ModelInfer(_request("gru", part, seq, **flags), metadata=c.md))

            got = [unary(a, xb[:, :3], start=True), unary(b, xb[:, 3:5])]
            # read to its end: only an ended stream frees the sequence for others
            (resp,) = b.kserve.ModelStreamInfer(
                iter([_request("gru", xb[:, 5:8], seq)]), metadata=b.md
            )
            assert not resp.error_message, resp.error_message
            got += [_out(resp.infer_response), unary(a, xb[:, 8:], end=True)]
            np.testing.assert_allclose(np.concatenate(got, axis=1)[0], ref, atol=EXACT)
            with pytest.raises(grpc.RpcError) as info:  # ended: its store record is gone
                unary(b, xb[:, :1])
            assert info.value.code() == Code.NOT_FOUND, info.value.details()

        with subtests.test("a bidirectional session revises the whole prefix"):
            sid = a.create("bigru")
            resps = a.stream(sid, [x[:4], x[4:9]])
            for r, n in zip(resps, (4, 9), strict=True):
                assert (r.start, r.steps_total, r.revised) == (0, n, True)
                want = _ort(zoo / "bigru.onnx", "x", x[:n])
                np.testing.assert_allclose(from_tensor(r.outputs["y"]), want, atol=EXACT)

        with subtests.test("Generate (greedy) is onnxruntime's argmax, token by token"):
            req = pb.GenerateRequest(model="charlm", prompt="abc", max_tokens=6, temperature=0)
            text = "".join(p.text for p in b.v1.Generate(req, metadata=b.md, timeout=60))
            ids = [CHARS.index(ch) for ch in "abc"]
            want = ""
            for _ in range(6):
                logits = _ort(zoo / "charlm.onnx", "tokens", np.array(ids, np.int64), "logits")
                ids.append(int(np.argmax(logits[-1])))
                want += CHARS[ids[-1]]
            assert text == want

        with subtests.test("snapshot, restore and fork continue exactly"):
            sid = a.create()
            a.stream(sid, [x[:5]])
            snap = b.v1.SnapshotSession(pb.SnapshotSessionRequest(session_id=sid), metadata=b.md)
            restored = b.v1.CreateSession(pb.CreateSessionRequest(snapshot=snap), metadata=b.md)
            fork = a.v1.ForkSession(pb.ForkSessionRequest(session_id=sid), metadata=a.md)
            for c, s in ((a, sid), (b, restored.session_id), (b, fork.session_id)):
                np.testing.assert_allclose(_y(c.stream(s, [x[5:]])), ref[5:], atol=EXACT)

        with subtests.test("reset and close of an attached session are refused from anywhere"):
            sid = a.create()
            held = a.open(sid)
            held.step(x[:2])
            for c in conns:
                for call, req in (
                    (c.v1.CloseSession, pb.CloseSessionRequest(session_id=sid)),
                    (c.v1.ResetSession, pb.ResetSessionRequest(session_id=sid)),
                    (
                        c.v1.Infer,
                        pb.InferRequest(
                            model="gru",
                            session_id=sid,
                            advance=True,
                            inputs={"x": to_tensor(x[None, 2:3])},
                        ),
                    ),
                ):
                    c.refused(call, req, match="attached to an open stream")
                    assert "lease ran out" not in c.refused(call, req)
            # the stream still owns it, untouched by the refusals
            np.testing.assert_allclose(
                from_tensor(held.step(x[2:5]).outputs["y"]), ref[2:5], atol=EXACT
            )
            held.close()
            # detached: reset and close from the other worker
            b.v1.ResetSession(pb.ResetSessionRequest(session_id=sid), metadata=b.md)
            np.testing.assert_allclose(_y(a.stream(sid, [x[:3]])), ref[:3], atol=EXACT)
            b.v1.CloseSession(pb.CloseSessionRequest(session_id=sid), metadata=b.md)
            a.refused(
                a.v1.ResetSession, pb.ResetSessionRequest(session_id=sid), code=Code.NOT_FOUND
            )

        with subtests.test("SIGTERM and kill -9 with a restart mid-session, each session kind"):
            kinds = {"stream": a.create(), "advance": a.create(), "bidir": a.create("bigru")}
            a.stream(kinds["stream"], [x[:5]])
            a.advance(kinds["advance"], x[:5])
            a.stream(kinds["bidir"], [x[:5]])
            data = tmp_path / "restart.npz"
            np.savez(data, x=x[None], ref=ref[None], tag=f"{name}-r")
            r = srv.triton(data, "start")
            assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
            for c in conns:
                c.close()
            conns = []
            srv = srv.restart(kill9=False)
            c = srv.conn()
            conns = [c]
            if store is None:  # in memory: a restart loses every session, and says so
                with pytest.raises(grpc.RpcError) as info:
                    c.stream(kinds["stream"], [x[5:]])
                assert info.value.code() == Code.NOT_FOUND, info.value.details()
                c.refused(
                    c.v1.SnapshotSession,
                    pb.SnapshotSessionRequest(session_id=kinds["advance"]),
                    code=Code.NOT_FOUND,
                )
                r = srv.triton(data, "finish")
                assert r.returncode != 0 and "NOT_FOUND" in r.stderr, r.stderr[-3000:]
            else:
                np.testing.assert_allclose(
                    _y(c.stream(kinds["stream"], [x[5:9]])), ref[5:9], atol=EXACT
                )
                np.testing.assert_allclose(
                    c.advance(kinds["advance"], x[5:9]), ref[5:9], atol=EXACT
                )
                got = c.stream(kinds["bidir"], [x[5:]])[0]
                np.testing.assert_allclose(
                    from_tensor(got.outputs["y"]), _ort(zoo / "bigru.onnx", "x", x), atol=EXACT
                )
                r = srv.triton(data, "finish")
                assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
                if cfg["workers"] == 1:  # kill -9: nothing acknowledged is lost either
                    c.close()
                    srv = srv.restart(kill9=True)
                    c = srv.conn()
                    conns = [c]
                    np.testing.assert_allclose(
                        _y(c.stream(kinds["stream"], [x[9:]])), ref[9:], atol=EXACT
                    )
                    np.testing.assert_allclose(
                        c.advance(kinds["advance"], x[9:]), ref[9:], atol=EXACT
                    )

        if cfg["store"] == "dir" and cfg["workers"] == 1:
            with subtests.test("the README's tritonclient example, against main.sh's server"):
                readme = (ROOT / "README.md").read_text(encoding="utf-8")
                (block,) = re.findall(r"```python tritonclient\n(.*?)```", readme, flags=re.S)
                code, n = re.subn(r"^TARGET = .*$", f"TARGET = {srv.target!r}", block, flags=re.M)
                assert n == 1
                r = subprocess.run(
                    [str(TRITON_PY), "-c", code], capture_output=True, text=True, timeout=120
                )
                assert r.returncode == 0, r.stderr[-3000:]
                worst = float(re.search(r"streamed vs whole: (\S+)", r.stdout).group(1))
                assert worst <= EXACT, r.stdout
    finally:
        for c in conns:
            c.close()
        srv.stop()
        if redis is not None:
            redis.stop()
