"""Security (issue 11): TLS and mTLS, bearer tokens, who owns a session, and quotas.

Certificates are made at test time with the ``openssl`` CLI (a throwaway CA, a server
certificate for 127.0.0.1/localhost, client certificates, and a rogue CA's client
certificate); servers run on loopback ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import shutil
import subprocess
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx_fixtures import build_zoo

from rnnzoo.client import Client
from rnnzoo.errors import InvalidArgument
from rnnzoo.proto.tensors import to_tensor
from rnnzoo.proto.v1 import rnnzoo_pb2 as pb
from rnnzoo.proto.v1 import rnnzoo_pb2_grpc as pb_grpc
from rnnzoo.server.runtime import Runtime, RuntimeOptions
from rnnzoo.server.transport import BackgroundServer, RnnzooServer, ServerConfig
from rnnzoo.server.transport import guard as guard_mod
from rnnzoo.server.transport.guard import TokenTable

Code = grpc.StatusCode
pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")

ALICE, BOB = "alice-token-0123456789abcdef", "bob-token-0123456789abcdefgh"


# ---- certificates ---------------------------------------------------------------------------
def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _ca(d: Path, name: str) -> None:
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.pem",
        "-days",
        "2",
        "-subj",
        f"/CN={name}",
        cwd=d,
    )


def _leaf(d: Path, name: str, ca: str, cn: str, server: bool) -> None:
    _openssl(
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.csr",
        "-subj",
        f"/CN={cn}",
        cwd=d,
    )
    ext = d / f"{name}.ext"
    ext.write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
        if server
        else "extendedKeyUsage=clientAuth\n"
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        f"{ca}.pem",
        "-CAkey",
        f"{ca}.key",
        "-CAcreateserial",
        "-out",
        f"{name}.pem",
        "-days",
        "2",
        "-extfile",
        ext.name,
        cwd=d,
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    _ca(d, "ca")
    _ca(d, "rogue")
    _leaf(d, "server", "ca", "localhost", server=True)
    _leaf(d, "alice", "ca", "alice", server=False)
    _leaf(d, "bob", "ca", "bob", server=False)
    _leaf(d, "mallory", "rogue", "alice", server=False)  # alice's name, the wrong CA
    return d


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("zoo")
    build_zoo(d)
    return d


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("auth") / "tokens"
    p.write_text(f"# principal:token\nalice:{ALICE}\n\nbob:{BOB}\n")
    p.chmod(0o600)
    return p


def _x(steps: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(steps, 3)).astype(np.float32)


def _background(zoo: Path, **config) -> BackgroundServer:
    opts = config.pop("options", {})

    def factory():
        return Runtime.from_dir(zoo, RuntimeOptions(session_ttl_s=None, **opts))

    return BackgroundServer(factory, ServerConfig(port=0, grace_s=0.2, **config))


# ---- TLS and mTLS -----------------------------------------------------------------------------
def test_tls_round_trip_and_a_plaintext_client_is_refused(zoo, pki):
    with _background(zoo, tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key")) as srv:
        with Client(srv.target, tls_ca=pki / "ca.pem", timeout=20) as c:
            assert "gru" in [m.name for m in c.models()]
            with c.session("gru") as s:
                x = _x(5)
                got = np.concatenate([s.step(x[:2])["y"], s.step(x[2:])["y"]])
            whole = c.infer("gru", x[None])["y"][0]
            np.testing.assert_allclose(got, whole, atol=1e-5)
        with Client(srv.target, timeout=5) as plain, pytest.raises(grpc.RpcError) as info:
            plain.models()
        assert info.value.code() == Code.UNAVAILABLE
        # a client that does not trust the server's CA refuses the server
        with (
            Client(srv.target, tls_ca=pki / "rogue.pem", timeout=5) as wary,
            pytest.raises(grpc.RpcError) as info,
        ):
            wary.models()
        assert info.value.code() == Code.UNAVAILABLE


def test_mtls_needs_a_certificate_from_the_client_ca_and_names_the_principal(zoo, pki):
    cfg = dict(
        tls_cert=str(pki / "server.pem"),
        tls_key=str(pki / "server.key"),
        tls_client_ca=str(pki / "ca.pem"),
    )
    with _background(zoo, **cfg) as srv:
        ca = pki / "ca.pem"

        def client(name: str | None) -> Client:
            if name is None:
                return Client(srv.target, tls_ca=ca, timeout=5)
            return Client(
                srv.target,
                tls_ca=ca,
                tls_cert=pki / f"{name}.pem",
                tls_key=pki / f"{name}.key",
                timeout=20,
            )

        for name in (None, "mallory"):  # no certificate; a certificate from another CA
            with client(name) as c, pytest.raises(grpc.RpcError) as info:
                c.models()
            assert info.value.code() == Code.UNAVAILABLE, name
        with client("alice") as a, client("bob") as b:
            assert a.models() and b.models()
            sid = a.create_session("gru").session_id
            with pytest.raises(grpc.RpcError) as info:
                b.resume(sid, "gru").step(_x(1))
            assert info.value.code() == Code.NOT_FOUND  # alice's session, by certificate
            assert a.resume(sid, "gru").step(_x(1)).steps_total == 1


# ---- bearer tokens ------------------------------------------------------------------------------
async def _token_server(zoo: Path, tokens_file: Path, **options) -> RnnzooServer:
    rate = options.pop("requests_per_s", 0.0)
    burst = options.pop("burst", None)
    cfg = ServerConfig(
        port=0, grace_s=0.2, auth_tokens=str(tokens_file), requests_per_s=rate, burst=burst
    )
    server = RnnzooServer(cfg)
    await server.start()
    options.setdefault("session_ttl_s", None)
    await server.load(Runtime.from_dir(zoo, RuntimeOptions(**options)))
    return server


def _md(token: str | None):
    return (("authorization", f"Bearer {token}"),) if token else None


async def _code(coro) -> tuple[Code, str]:
    try:
        await coro
    except grpc.aio.AioRpcError as err:
        return err.code(), err.details() or ""
    return Code.OK, ""


async def _stream(stub, sid: str, token: str | None, x: np.ndarray):
    async def reqs():
        yield pb.StreamRequest(session_id=sid, request_id=1, inputs={"x": to_tensor(x)})

    return [r async for r in stub.Stream(reqs(), metadata=_md(token))]


async def test_tokens_are_required_on_every_rpc_and_say_how(zoo, tokens_file):
    server = await _token_server(zoo, tokens_file)
    try:
        async with grpc.aio.insecure_channel(server.target) as ch:
            stub = pb_grpc.RnnzooStub(ch)
            calls = {
                "ListModels": lambda md: stub.ListModels(pb.ListModelsRequest(), metadata=md),
                "GetModel": lambda md: stub.GetModel(pb.GetModelRequest(name="gru"), metadata=md),
                "CreateSession": lambda md: stub.CreateSession(
                    pb.CreateSessionRequest(model="gru"), metadata=md
                ),
                "Infer": lambda md: stub.Infer(
                    pb.InferRequest(model="gru", inputs={"x": to_tensor(_x(2)[None])}), metadata=md
                ),
                "Generate": lambda md: _consume(
                    stub.Generate(
                        pb.GenerateRequest(model="charlm", prompt="ab", max_tokens=2), metadata=md
                    )
                ),
                "Stream": lambda md: _consume(
                    stub.Stream(_one(pb.StreamRequest(session_id="x")), metadata=md)
                ),
                "Reflection": lambda md: _reflect(ch, md),
            }
            for name, call in calls.items():
                for md, why in (
                    (None, "carried none"),
                    (_md("not-a-valid-token-at-all"), "not valid"),
                    ((("authorization", ALICE),), "not valid"),  # no "Bearer "
                ):
                    code, details = await _code(call(md))
                    assert code == Code.UNAUTHENTICATED, (name, code, details)
                    assert why in details and "authorization: Bearer <token>" in details, details
                code, details = await _code(call(_md(ALICE)))
                assert code in (Code.OK, Code.NOT_FOUND), (name, code, details)  # Stream: "x"
            # health answers without a token (load balancers probe it)
            health = health_pb2_grpc.HealthStub(ch)
            resp = await health.Check(health_pb2.HealthCheckRequest(service=""))
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        assert server.guard.refused["UNAUTHENTICATED"] >= 21
        assert server.admission.refused == 0  # refused before admission: no slots taken
    finally:
        await server.stop(0.2)


async def _consume(call):
    return [r async for r in call]


async def _one(item):
    yield item


async def _reflect(ch, md):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(ch)
    req = reflection_pb2.ServerReflectionRequest(list_services="")
    return [r async for r in stub.ServerReflectionInfo(_one(req), metadata=md)]


async def test_sessions_belong_to_their_principal_others_get_not_found(zoo, tokens_file):
    server = await _token_server(zoo, tokens_file)
    try:
        async with grpc.aio.insecure_channel(server.target) as ch:
            stub = pb_grpc.RnnzooStub(ch)
            sid = (
                await stub.CreateSession(pb.CreateSessionRequest(model="gru"), metadata=_md(ALICE))
            ).session_id
            x = _x(4, seed=2)
            assert (await _stream(stub, sid, ALICE, x[:2]))[0].steps_total == 2
            # bob: every way of touching it says it does not exist, in the words used for
            # an id that never existed
            fake = sid[:-4] + ("AAAA" if not sid.endswith("AAAA") else "BBBB")
            for target in (sid, fake):
                probes = [
                    _stream(stub, target, BOB, x[2:3]),
                    stub.Infer(
                        pb.InferRequest(
                            model="gru", session_id=target, inputs={"x": to_tensor(x[None, 2:3])}
                        ),
                        metadata=_md(BOB),
                    ),
                    stub.Infer(
                        pb.InferRequest(
                            model="gru",
                            session_id=target,
                            advance=True,
                            inputs={"x": to_tensor(x[None, 2:3])},
                        ),
                        metadata=_md(BOB),
                    ),
                    stub.ResetSession(pb.ResetSessionRequest(session_id=target), metadata=_md(BOB)),
                    stub.CloseSession(pb.CloseSessionRequest(session_id=target), metadata=_md(BOB)),
                ]
                for probe in probes:
                    code, details = await _code(probe)
                    assert code == Code.NOT_FOUND, (code, details)
                    assert "no session" in details and "create one first" in details, details
            # nothing bob did moved alice's session
            assert (await _stream(stub, sid, ALICE, x[2:]))[0].steps_total == 4
            # closed: alice is told why; bob still hears "no session"
            await stub.CloseSession(pb.CloseSessionRequest(session_id=sid), metadata=_md(ALICE))
            _, mine = await _code(
                stub.ResetSession(pb.ResetSessionRequest(session_id=sid), metadata=_md(ALICE))
            )
            _, theirs = await _code(
                stub.ResetSession(pb.ResetSessionRequest(session_id=sid), metadata=_md(BOB))
            )
            assert "was closed" in mine and "no session" in theirs and "closed" not in theirs
    finally:
        await server.stop(0.2)


def test_client_sends_its_token_and_refuses_clear_text_beyond_loopback(zoo, tokens_file):
    with _background(zoo, auth_tokens=str(tokens_file)) as srv:
        with Client(srv.target, token=ALICE, timeout=20) as a:
            with a.session("gru") as s:
                assert s.step(_x(2)).steps_total == 2
            assert "".join(a.generate("charlm", "ab", max_tokens=3, seed=1))
        with Client(srv.target, timeout=5) as anon, pytest.raises(grpc.RpcError) as info:
            anon.models()
        assert info.value.code() == Code.UNAUTHENTICATED
    with pytest.raises(InvalidArgument, match="clear text"):
        Client("10.1.2.3:50051", token=ALICE)


def test_token_files_lines_or_json_and_their_mistakes(tmp_path):
    lines = tmp_path / "t.txt"
    lines.write_text(f"alice:{ALICE}\n# comment\nbob : {BOB}\n")
    js = tmp_path / "t.json"
    js.write_text(json.dumps({"alice": ALICE, "bob": BOB}))
    js_list = tmp_path / "l.json"
    js_list.write_text(json.dumps([{"principal": "alice", "token": ALICE}]))
    for p in (lines, js):
        t = TokenTable.from_file(p)
        assert t.principals == ["alice", "bob"]
        assert t.lookup(ALICE) == "alice" and t.lookup(BOB) == "bob"
        assert t.lookup(ALICE[:-1]) is None and t.lookup("") is None
    assert TokenTable.from_file(js_list).lookup(ALICE) == "alice"
    bad = {
        "short": "alice:tooshort\n",
        "share a token": f"alice:{ALICE}\nbob:{ALICE}\n",
        "appears twice": f"alice:{ALICE}\nalice:{BOB}\n",
        "expected 'principal:token'": f"{ALICE}\n",
        "use 1-64 characters": f"a b:{ALICE}\n",
        "empty": "# nobody\n",
    }
    for why, text in bad.items():
        p = tmp_path / "bad"
        p.write_text(text)
        with pytest.raises(InvalidArgument, match=why):
            TokenTable.from_file(p)
    with pytest.raises(InvalidArgument, match="cannot read the token file"):
        TokenTable.from_file(tmp_path / "missing")


def test_token_lookup_compares_every_entry(monkeypatch):
    table = TokenTable({f"p{i}": f"token-number-{i:04d}-padding" for i in range(50)})
    calls = []
    real = hmac.compare_digest

    def counting(a, b):
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(guard_mod.hmac, "compare_digest", counting)
    for token in ("token-number-0000-padding", "token-number-0049-padding", "nope"):
        calls.clear()
        table.lookup(token)
        assert len(calls) == 50  # no early exit, whichever entry matches (or none)


# ---- quotas ----------------------------------------------------------------------------------------
async def test_session_quota_per_principal(zoo, tokens_file):
    server = await _token_server(zoo, tokens_file, max_sessions_per_client=2, session_ttl_s=300)
    try:
        async with grpc.aio.insecure_channel(server.target) as ch:
            stub = pb_grpc.RnnzooStub(ch)

            def create(token):
                return stub.CreateSession(pb.CreateSessionRequest(model="gru"), metadata=_md(token))

            a1, _ = await create(ALICE), await create(ALICE)
            code, details = await _code(create(ALICE))
            assert code == Code.RESOURCE_EXHAUSTED
            assert "principal 'alice'" in details and "max_sessions_per_client=2" in details
            assert "retry" in details and "idle TTL 300 s" in details
            assert (await create(BOB)).session_id  # bob's quota is his own
            await stub.CloseSession(
                pb.CloseSessionRequest(session_id=a1.session_id), metadata=_md(ALICE)
            )
            assert (await create(ALICE)).session_id  # a closed session frees its slot
    finally:
        await server.stop(0.2)


async def test_session_quota_per_connection_without_authentication(zoo):
    server = RnnzooServer(ServerConfig(port=0, grace_s=0.2))
    await server.start()
    await server.load(
        Runtime.from_dir(zoo, RuntimeOptions(session_ttl_s=None, max_sessions_per_client=3))
    )
    try:
        async with (
            grpc.aio.insecure_channel(server.target) as a,
            grpc.aio.insecure_channel(
                server.target, options=[("grpc.use_local_subchannel_pool", 1)]
            ) as b,
        ):
            sa, sb = pb_grpc.RnnzooStub(a), pb_grpc.RnnzooStub(b)
            for _ in range(3):
                await sa.CreateSession(pb.CreateSessionRequest(model="gru"))
            code, details = await _code(sa.CreateSession(pb.CreateSessionRequest(model="gru")))
            assert code == Code.RESOURCE_EXHAUSTED and "this connection" in details, details
            await sb.CreateSession(pb.CreateSessionRequest(model="gru"))  # another connection
    finally:
        await server.stop(0.2)


@contextlib.asynccontextmanager
async def _two_servers(zoo: Path, tokens_file: Path, **options):
    """Two token servers sharing ``options`` (a state store): a stub for each."""
    a = await _token_server(zoo, tokens_file, **options)
    b = await _token_server(zoo, tokens_file, **options)
    try:
        async with (
            grpc.aio.insecure_channel(a.target) as ca,
            grpc.aio.insecure_channel(b.target) as cb,
        ):
            yield pb_grpc.RnnzooStub(ca), pb_grpc.RnnzooStub(cb)
    finally:
        await a.stop(0.2)
        await b.stop(0.2)


async def test_session_quota_is_counted_across_servers_sharing_a_store(
    zoo, tokens_file, state_store
):
    kw = dict(max_sessions_per_client=2, session_ttl_s=300, state_store=state_store)
    async with _two_servers(zoo, tokens_file, **kw) as (sa, sb):

        def create(stub, token):
            return stub.CreateSession(pb.CreateSessionRequest(model="gru"), metadata=_md(token))

        await create(sa, ALICE)
        on_b = await create(sb, ALICE)  # one on each server: each holds one locally
        code, details = await _code(create(sa, ALICE))
        assert code == Code.RESOURCE_EXHAUSTED, details
        assert "principal 'alice'" in details and "max_sessions_per_client=2" in details
        assert "across the servers sharing the state store" in details
        assert (await create(sb, BOB)).session_id  # bob's quota is his own
        await sb.CloseSession(
            pb.CloseSessionRequest(session_id=on_b.session_id), metadata=_md(ALICE)
        )
        assert (await create(sa, ALICE)).session_id  # closed on B: a slot frees on A


async def test_request_rate_quota_is_shared_across_servers_sharing_a_store(
    zoo, tokens_file, state_store
):
    kw = dict(requests_per_s=2.0, burst=4, state_store=state_store)
    async with _two_servers(zoo, tokens_file, **kw) as stubs:

        def listing(i: int, token: str):
            return _code(stubs[i % 2].ListModels(pb.ListModelsRequest(), metadata=_md(token)))

        got = [await listing(i, ALICE) for i in range(8)]  # alternating servers
        codes = [code for code, _ in got]
        assert codes[:4] == [Code.OK] * 4, codes  # the burst, taken from both servers
        assert codes.count(Code.OK) <= 5, codes  # 4 + what refilled; in-process buckets: 8
        refusals = [details for code, details in got if code == Code.RESOURCE_EXHAUSTED]
        assert refusals and all("across the servers sharing the state store" in d for d in refusals)
        assert (await listing(1, ALICE))[0] == Code.RESOURCE_EXHAUSTED
        assert (await listing(0, BOB))[0] == Code.OK  # bob's bucket is his own


async def test_request_rate_quota_per_principal_counts_stream_messages(zoo, tokens_file):
    server = await _token_server(zoo, tokens_file, requests_per_s=2.0, burst=4)
    try:
        async with grpc.aio.insecure_channel(server.target) as ch:
            stub = pb_grpc.RnnzooStub(ch)

            def listing(token):
                return stub.ListModels(pb.ListModelsRequest(), metadata=_md(token))

            for _ in range(4):
                await listing(ALICE)
            code, details = await _code(listing(ALICE))
            assert code == Code.RESOURCE_EXHAUSTED, details
            assert "principal 'alice'" in details and "2 requests/s" in details
            assert "requests_per_s" in details and "retry in" in details
            await listing(BOB)  # bob has his own bucket
            await asyncio.sleep(1.1)  # two requests' worth refills
            sid = (
                await stub.CreateSession(pb.CreateSessionRequest(model="gru"), metadata=_md(BOB))
            ).session_id
            # bob has ~2 left: a Stream of 4 messages runs out on its 3rd or 4th message
            call = stub.Stream(metadata=_md(BOB))
            answered = 0
            for i in range(4):
                await call.write(
                    pb.StreamRequest(session_id=sid, request_id=i, inputs={"x": to_tensor(_x(1))})
                )
                resp = await _code(call.read())
                if resp[0] != Code.OK:
                    code, details = resp
                    break
                answered += 1
            assert code == Code.RESOURCE_EXHAUSTED and "requests_per_s" in details, details
            assert 1 <= answered <= 3
    finally:
        await server.stop(0.2)
