"""The rnnzoo.v1.Rnnzoo servicer: validate -> call the runtime -> build the response.

Errors are raised as rnnzoo.errors classes and mapped to statuses by ``ErrorInterceptor``;
nothing here touches status codes. ``annotate`` adds session/model keys to the RPC's log line.
"""

from __future__ import annotations

import grpc

from rnnzoo.errors import InvalidArgument
from rnnzoo.proto.tensors import fill_tensors, from_tensors, to_tensors
from rnnzoo.proto.v1 import rnnzoo_pb2 as pb
from rnnzoo.proto.v1 import rnnzoo_pb2_grpc as pb_grpc
from rnnzoo.server.runtime import Runtime

from .convert import model_info, request_inputs
from .logs import annotate, call_fields


def _need(value: str, what: str) -> str:
    if not value:
        raise InvalidArgument(f"{what} is empty; set it in the request")
    return value


class RnnzooServicer(pb_grpc.RnnzooServicer):
    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime

    async def ListModels(self, request, context):
        return pb.ListModelsResponse(models=[model_info(m) for m in self.rt.list_models()])

    async def GetModel(self, request, context):
        annotate(model=request.name)
        return model_info(self.rt.get_model(_need(request.name, "name")))

    async def CreateSession(self, request, context):
        annotate(model=request.model)
        state = from_tensors(request.initial_state, what="initial state")
        ttl = request.ttl_s if request.HasField("ttl_s") else None
        info = self.rt.create_session(_need(request.model, "model"), state or None, ttl)
        annotate(session=info.id)
        return pb.Session(
            session_id=info.id, model=info.model, created_at=info.created_at, ttl_s=info.ttl_s or 0
        )

    async def CloseSession(self, request, context):
        annotate(session=request.session_id)
        self.rt.close_session(_need(request.session_id, "session_id"))
        return pb.CloseSessionResponse()

    async def ResetSession(self, request, context):
        annotate(session=request.session_id)
        self.rt.reset_session(_need(request.session_id, "session_id"))
        return pb.ResetSessionResponse()

    async def Stream(self, request_iterator, context):
        # Read/write style (a coroutine, not an async generator): the interceptor then wraps
        # the call once instead of re-yielding every response through a second generator.
        # session id -> (attach token, model). Sessions stay attached for the stream's life;
        # ``finally`` detaches them on every exit: end, error, or client disconnect.
        attached: dict[str, tuple[object, str]] = {}
        fields = call_fields()  # this RPC's log line: last request id and count
        if fields is None:  # not under the interceptor (e.g. called directly)
            fields = {}
        count = 0
        try:
            while (req := await context.read()) is not grpc.aio.EOF:
                count += 1
                fields["request_id"], fields["requests"] = req.request_id, count
                sid = _need(req.session_id, "session_id")
                if sid not in attached:
                    model = self.rt.session_info(sid).model
                    attached[sid] = (self.rt.attach(sid), model)
                    annotate(session=sid, model=model)
                inputs = request_inputs(self.rt, attached[sid][1], req, batched=False)
                res = await self.rt.step(sid, inputs)
                resp = pb.StreamResponse(
                    request_id=req.request_id,
                    session_id=sid,
                    start=res.start,
                    steps_total=res.steps_total,
                    revised=res.revised,
                )
                fill_tensors(resp.outputs, res.outputs)
                await context.write(resp)
        finally:
            for sid, (token, _) in attached.items():
                self.rt.detach(sid, token)

    async def Infer(self, request, context):
        model = _need(request.model, "model")
        annotate(model=model, session=request.session_id)
        inputs = request_inputs(self.rt, model, request, batched=True)
        outputs = await self.rt.infer(
            model, inputs, session_id=request.session_id or None, advance=request.advance
        )
        return pb.InferResponse(outputs=to_tensors(outputs))

    async def Generate(self, request, context):
        model = _need(request.model, "model")
        annotate(model=model)
        temperature = request.temperature if request.HasField("temperature") else 1.0
        seed = request.seed if request.HasField("seed") else None
        pieces = self.rt.generate(
            model, request.prompt, request.max_tokens, temperature, request.top_k, seed
        )
        index = 0
        async for piece in pieces:
            yield pb.GenerateResponse(text=piece, index=index)
            index += 1
