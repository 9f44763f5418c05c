"""The rnnzoo.v1.Rnnzoo servicer: validate -> call the runtime -> build the response.

Errors are raised as rnnzoo.errors classes and mapped to statuses by ``ErrorInterceptor``;
nothing here touches status codes. ``annotate`` adds session/model keys to the RPC's log line
(session ids shortened, client strings clipped: see ``runtime/redact.py``).

A response that changes a session is built and checked against the message size limit
inside the runtime's ``stepping``/``inferring`` block: the session moves on only once the
response is on its way (Stream: written), so a request answered with an error changes nothing.
"""

from __future__ import annotations

import time

import grpc

from rnnzoo.errors import InvalidArgument, ResourceExhausted
from rnnzoo.proto.tensors import fill_tensors, from_tensors, to_tensors
from rnnzoo.proto.v1 import rnnzoo_pb2 as pb
from rnnzoo.server.runtime import Runtime
from rnnzoo.server.runtime.lease import new_holder
from rnnzoo.server.runtime.redact import clip, sid_short

from . import metrics
from .codec import checked
from .convert import model_info, request_inputs
from .guard import charge
from .logs import annotate, call_fields
from .snapshots import from_proto, to_proto
from .step_many import StepMany

DEFAULT_MAX_RESPONSE_BYTES = 16 << 20


def _need(value: str, what: str) -> str:
    if not value:
        raise InvalidArgument(f"{what} is empty; set it in the request")
    return value


class RnnzooServicer:
    def __init__(self, runtime: Runtime, max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES):
        self.rt = runtime
        self.max_response_bytes = max_response_bytes

    def _fits(self, resp) -> None:
        """Refuse a response over the message size limit before the session moves on (grpc
        would fail the call after our state change otherwise)."""
        size = resp.ByteSize()
        if size > self.max_response_bytes:
            raise ResourceExhausted(
                f"the response would be {size} bytes, over this server's message limit of "
                f"{self.max_response_bytes} bytes; send fewer steps per request"
            )

    async def ListModels(self, request, context):
        repo = self.rt.repo
        return pb.ListModelsResponse(
            models=[model_info(m, repo.table.get(m.name)) for m in self.rt.list_models()]
        )

    async def GetModel(self, request, context):
        annotate(model=clip(request.name))
        info = self.rt.get_model(_need(request.name, "name"))
        return model_info(info, self.rt.repo.table.get(info.name))

    async def CreateSession(self, request, context):
        annotate(model=clip(request.model or request.snapshot.model))
        state = from_tensors(request.initial_state, what="initial state")
        ttl = request.ttl_s if request.HasField("ttl_s") else None
        version = request.version if request.HasField("version") else 0
        if request.HasField("snapshot"):
            snap = from_proto(request.snapshot)
            snap.model = self._snapshot_key(snap, request.snapshot.version)
            if version:
                self._same_version(snap.model, version)
            snap = self.rt.restore_snapshot(snap)
            model = request.model
            if model and model == self.rt.repo.name_of(snap.model):
                model = snap.model  # the snapshot's version of the model asked for
            info = await self.rt.create_session(model, state, ttl, snapshot=snap)
        else:
            model = _need(request.model, "model")
            if version:
                model = self.rt.repo.resolve(model, version)
            info = await self.rt.create_session(model, state or None, ttl)
        annotate(session=sid_short(info.id), version=info.version)
        return _session(info)

    def _snapshot_key(self, snap, version: int) -> str:
        """The version a snapshot restores onto: its own; for one taken before versions
        existed, the newest ready version with the snapshot's graph hash (else the newest:
        the hash check then says which version it needs)."""
        repo = self.rt.repo
        name = repo.name_of(snap.model)
        if version:
            return f"{name}@{version}"
        for v in reversed(repo.served_versions(name)):
            key = f"{name}@{v}"
            if self.rt.records.model_hash(key) == snap.model_hash:
                return key
        return repo.pin(name)

    def _same_version(self, key: str, version: int) -> None:
        if not key.endswith(f"@{version}"):
            raise InvalidArgument(
                f"the snapshot was taken on {key.replace('@', ' version ')}, and version "
                f"{version} was asked for; a snapshot restores onto its own version (leave "
                "version unset)"
            )

    async def SnapshotSession(self, request, context):
        annotate(session=sid_short(request.session_id))
        return to_proto(*await self.rt.snapshot_session(_need(request.session_id, "session_id")))

    async def ForkSession(self, request, context):
        annotate(session=sid_short(request.session_id))
        ttl = request.ttl_s if request.HasField("ttl_s") else None
        info = await self.rt.fork_session(_need(request.session_id, "session_id"), ttl)
        return _session(info)

    async def CloseSession(self, request, context):
        annotate(session=sid_short(request.session_id))
        await self.rt.close_session(_need(request.session_id, "session_id"))
        return pb.CloseSessionResponse()

    async def ResetSession(self, request, context):
        annotate(session=sid_short(request.session_id))
        await self.rt.reset_session(_need(request.session_id, "session_id"))
        return pb.ResetSessionResponse()

    async def Stream(self, request_iterator, context):
        # Read/write style (a coroutine, not an async generator): the interceptor then wraps
        # the call once instead of re-yielding every response through a second generator.
        # session id -> (its lease, model). Sessions stay attached for the stream's life;
        # ``finally`` detaches them on every exit: end, error, or client disconnect. The
        # runtime renews the leases while the call is not done (a dead peer's call ends
        # when keepalive gives up on it).
        attached: dict[str, tuple[object, str]] = {}
        fields = call_fields()  # this RPC's log line: last request id and count
        if fields is None:  # not under the interceptor (e.g. called directly)
            fields = {}
        count = 0
        holder = new_holder()

        def alive() -> bool:
            return not context.done()

        try:
            while (req := await context.read()) is not grpc.aio.EOF:
                t0 = time.perf_counter()
                count += 1
                # the request-rate quota: each message after the call's first
                if count > 1 and (wait := charge()) is not None:
                    await wait
                req = checked(req)
                fields["request_id"], fields["requests"] = req.request_id, count
                sid = _need(req.session_id, "session_id")
                if sid not in attached:
                    lease = await self.rt.attach(sid, holder, alive)
                    info = self.rt.session_info(sid)
                    # the session's own version, however many came since
                    model = f"{info.model}@{info.version}" if info.version else info.model
                    attached[sid] = (lease, model)
                    annotate(session=sid_short(sid), model=info.model, version=info.version)
                lease, model = attached[sid]
                inputs = request_inputs(self.rt, model, req, batched=False)
                position = req.position if req.HasField("position") else None
                async with self.rt.stepping(sid, inputs, lease, position) as res:
                    # a replayed position (applied before, by either RPC) answers the same
                    resp = pb.StreamResponse(
                        request_id=req.request_id,
                        session_id=sid,
                        start=res.start,
                        steps_total=res.steps_total,
                        revised=res.revised,
                    )
                    fill_tensors(resp.outputs, res.outputs)
                    self._fits(resp)
                    await res.persist()  # before it goes out
                    await context.write(resp)
                metrics.request("Stream", "rnnzoo.v1", "OK", time.perf_counter() - t0, model)
        finally:
            for sid, (lease, _) in attached.items():
                self.rt.detach(sid, lease)
            await self.rt.released()  # the client's next call finds the sessions free

    async def StepMany(self, request_iterator, context):
        # read/write style, like Stream; the handler is its own file (step_many.py)
        await StepMany(self).run(context)

    async def Infer(self, request, context):
        model = _need(request.model, "model")
        annotate(model=clip(model), session=sid_short(request.session_id))
        inputs = request_inputs(self.rt, model, request, batched=True)
        position = request.position if request.HasField("position") else None
        sid = request.session_id or None
        if not request.advance or sid is None:
            outputs = await self.rt.infer(model, inputs, sid, request.advance, position)
            resp = pb.InferResponse(outputs=to_tensors(outputs))
            self._fits(resp)
            return resp
        async with self.rt.advancing(model, inputs, sid, position) as res:
            # a replayed position (applied before, by either RPC) answers the same
            resp = pb.InferResponse(outputs=to_tensors(self.rt.batched(model, res.outputs)))
            self._fits(resp)
            await res.persist()  # before it goes out
        return resp

    async def Generate(self, request, context):
        model = _need(request.model, "model")
        annotate(model=clip(model))
        temperature = request.temperature if request.HasField("temperature") else 1.0
        seed = request.seed if request.HasField("seed") else None
        pieces = self.rt.generate(
            model, request.prompt, request.max_tokens, temperature, request.top_k, seed
        )
        index = 0
        async for piece in pieces:
            yield pb.GenerateResponse(text=piece, index=index)
            index += 1


def _session(info) -> pb.Session:
    return pb.Session(
        session_id=info.id,
        model=info.model,
        created_at=info.created_at,
        ttl_s=info.ttl_s or 0,
        version=info.version,
    )
