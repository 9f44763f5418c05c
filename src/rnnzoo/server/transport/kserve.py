"""``inference.GRPCInferenceService`` (KServe v2 / Open Inference Protocol with Triton's
extensions) over the same runtime as rnnzoo.v1: validate -> runtime -> response.

Served on the same port as rnnzoo.v1. Requests are decoded by our own deserializers
(``codec.py``: undecodable bytes are INVALID_ARGUMENT), admitted and mapped to status codes
by the same interceptor, from the same one table (``interceptors.STATUS``). Sequences
(``sequence_id``/``sequence_start``/``sequence_end``) are the runtime's
(``runtime/sequences.py``); text is the runtime's (``runtime/text.py``). What this module owns
is the mapping of messages: docs/kserve.md.
"""

from __future__ import annotations

import logging
import time

import grpc

from rnnzoo.contract import Contract
from rnnzoo.errors import InvalidArgument, NotFound, ResourceExhausted, RnnzooError
from rnnzoo.proto.inference.v2 import grpc_service_pb2 as kpb
from rnnzoo.proto.inference.v2 import model_config_pb2 as mc
from rnnzoo.server.runtime import Runtime
from rnnzoo.server.runtime.redact import clip
from rnnzoo.server.runtime.sequences import Holder
from rnnzoo.server.runtime.text import text_inputs

from . import metrics
from .codec import checked
from .convert import public_contract_json
from .guard import charge
from .interceptors import status_of
from .kserve_tensors import OF_DTYPE, decode_inputs, fill_outputs, param_value
from .logs import annotate, call_fields

LOG = logging.getLogger("rnnzoo.rpc")
SERVER_NAME = "rnnzoo"
EXTENSIONS = ["sequence", "model_configuration", "statistics", "binary_tensor_data"]
PLATFORM = "onnxruntime_onnx"
VERSION = "1"  # every model has one version


def _need(value: str, what: str) -> str:
    if not value:
        raise InvalidArgument(f"{what} is empty; set it in the request")
    return value


def _dims(shape: list) -> list[int]:
    return [d if isinstance(d, int) else -1 for d in shape]


def _sequence(params) -> tuple[int | str, bool, bool]:
    """(sequence_id, sequence_start, sequence_end) from request parameters."""
    seq_id: int | str = 0
    if "sequence_id" in params:
        p = params["sequence_id"]
        which = p.WhichOneof("parameter_choice")
        if which not in ("int64_param", "uint64_param", "string_param"):
            raise InvalidArgument(
                f"parameter sequence_id must be int64_param or string_param, got {which}"
            )
        seq_id = getattr(p, which)
    flags = []
    for name in ("sequence_start", "sequence_end"):
        value = param_value(params[name]) if name in params else False
        if not isinstance(value, bool):
            raise InvalidArgument(f"parameter {name} must be a bool_param, got {value!r}")
        flags.append(value)
    return seq_id, flags[0], flags[1]


class ModelStats:
    """Per model counters for ModelStatistics."""

    __slots__ = ("execution", "fail", "fail_ns", "inferences", "last_ms", "success", "success_ns")

    def __init__(self) -> None:
        self.success = self.success_ns = self.fail = self.fail_ns = 0
        self.inferences = self.execution = self.last_ms = 0

    def record(self, ok: bool, ns: int, batch: int) -> None:
        if ok:
            self.success += 1
            self.success_ns += ns
            self.inferences += batch
            self.execution += 1
            self.last_ms = int(time.time() * 1000)
        else:
            self.fail += 1
            self.fail_ns += ns


class KServeServicer:
    """One method per implemented RPC of inference.GRPCInferenceService."""

    def __init__(self, runtime, max_response_bytes: int) -> None:
        self.rt = runtime  # replaced by the loaded runtime (server.load)
        self.max_response_bytes = max_response_bytes
        self.stats: dict[str, ModelStats] = {}

    # ---- helpers ---------------------------------------------------------------------------
    def _ready(self) -> bool:
        return isinstance(self.rt, Runtime) and self.rt.ready

    def _version(self, name: str, version: str) -> None:
        if version not in ("", VERSION):
            raise NotFound(
                f"model {clip(name)!r} has no version {clip(version)!r}; it has version "
                f"{VERSION} (or leave the version empty)"
            )

    def _fits(self, resp) -> None:
        size = resp.ByteSize()
        if size > self.max_response_bytes:
            raise ResourceExhausted(
                f"the response would be {size} bytes, over this server's message limit of "
                f"{self.max_response_bytes} bytes; send fewer steps per request"
            )

    @staticmethod
    def _message(code: str, t0: int) -> None:
        metrics.request("ModelStreamInfer", "kserve", code, (time.perf_counter_ns() - t0) / 1e9)

    def _record(self, model: str, ok: bool, t0: int, batch: int = 1) -> None:
        if model in self.rt.repo.entries:  # never grow the table from client strings
            stats = self.stats.get(model)
            if stats is None:
                stats = self.stats[model] = ModelStats()
            stats.record(ok, time.perf_counter_ns() - t0, batch)

    # ---- health and metadata -----------------------------------------------------------------
    async def ServerLive(self, request, context):
        return kpb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return kpb.ServerReadyResponse(ready=self._ready())

    async def ModelReady(self, request, context):
        name = _need(request.name, "name")
        annotate(model=clip(name))
        if not self._ready():
            return kpb.ModelReadyResponse(ready=False)
        ok = name in self.rt.repo.entries and request.version in ("", VERSION)
        return kpb.ModelReadyResponse(ready=ok)

    async def ServerMetadata(self, request, context):
        from importlib.metadata import PackageNotFoundError, version

        try:
            v = version("rnnzoo")
        except PackageNotFoundError:  # pragma: no cover - a source tree without install
            v = "0"
        return kpb.ServerMetadataResponse(name=SERVER_NAME, version=v, extensions=EXTENSIONS)

    async def ModelMetadata(self, request, context):
        name = _need(request.name, "name")
        annotate(model=clip(name))
        info = self.rt.get_model(name)
        self._version(name, request.version)
        first = info.contracts.get("model") or info.contracts["encoder"]
        last = info.contract

        def meta(spec) -> kpb.ModelMetadataResponse.TensorMetadata:
            return kpb.ModelMetadataResponse.TensorMetadata(
                name=spec.name,
                datatype=OF_DTYPE.get(spec.dtype, spec.dtype.upper()),
                shape=_dims(spec.shape),
            )

        return kpb.ModelMetadataResponse(
            name=info.name,
            versions=[VERSION],
            platform=PLATFORM,
            inputs=[meta(s) for s in first.inputs],
            outputs=[meta(s) for s in last.outputs],
        )

    async def ModelConfig(self, request, context):
        name = _need(request.name, "name")
        annotate(model=clip(name))
        info = self.rt.get_model(name)
        self._version(name, request.version)
        return kpb.ModelConfigResponse(config=self._config(info))

    def _config(self, info) -> mc.ModelConfig:
        first = info.contracts.get("model") or info.contracts["encoder"]
        last = info.contract
        specs = [*first.inputs, *last.outputs]
        batched = all(s.batch_axis == 0 for s in specs)
        opts = self.rt.options

        def dims(spec) -> list[int]:
            return _dims(spec.shape[1:] if batched else spec.shape)

        def dtype(name: str) -> int:
            return mc.DataType.Value("TYPE_" + OF_DTYPE.get(name, "INVALID"))

        config = mc.ModelConfig(
            name=info.name,
            platform=PLATFORM,
            backend="onnxruntime",
            max_batch_size=opts.max_batch if batched else 0,
            input=[
                mc.ModelInput(name=s.name, data_type=dtype(s.dtype), dims=dims(s))
                for s in first.inputs
            ],
            output=[
                mc.ModelOutput(name=s.name, data_type=dtype(s.dtype), dims=dims(s))
                for s in last.outputs
            ],
        )
        config.parameters["task"].string_value = info.task
        config.parameters["streamable"].string_value = str(info.streamable).lower()
        for role, c in info.contracts.items():
            key = "rnnzoo.contract" if role == "model" else f"rnnzoo.contract.{role}"
            config.parameters[key].string_value = public_contract_json(c)
        if "model" not in info.contracts:  # seq2seq: generation is rnnzoo.v1's
            config.parameters[
                "inference"
            ].string_value = (
                "rnnzoo.v1 Generate only (seq2seq decoding is not mapped onto KServe v2)"
            )
            return config
        seq = config.sequence_batching
        ttl = self.rt.sessions.ttl_s
        seq.max_sequence_idle_microseconds = int(ttl * 1e6) if ttl else 0
        seq.oldest.max_candidate_sequences = opts.max_sessions
        seq.oldest.max_queue_delay_microseconds = int(opts.max_delay_ms * 1000)
        for st in first.states:
            shape = Contract.state_feature_shape(first, st)
            seq.state.add(
                input_name=st.input,
                output_name=st.output,
                data_type=dtype(st.dtype),
                dims=shape,
                initial_state=[
                    mc.ModelSequenceBatching.InitialState(
                        data_type=dtype(st.dtype), dims=shape, zero_data=True, name="zeros"
                    )
                ]
                if st.init == "zeros"
                else [],
            )
        return config

    async def ModelStatistics(self, request, context):
        names = [request.name] if request.name else sorted(self.rt.repo.entries)
        if request.name:
            annotate(model=clip(request.name))
            self.rt.get_model(request.name)  # NotFound for an unknown model
            self._version(request.name, request.version)
        resp = kpb.ModelStatisticsResponse()
        for n in names:
            s = self.stats.get(n) or ModelStats()
            m = resp.model_stats.add(
                name=n,
                version=VERSION,
                last_inference=s.last_ms,
                inference_count=s.inferences,
                execution_count=s.execution,
            )
            m.inference_stats.success.count, m.inference_stats.success.ns = s.success, s.success_ns
            m.inference_stats.fail.count, m.inference_stats.fail.ns = s.fail, s.fail_ns
        return resp

    # ---- inference ------------------------------------------------------------------------------
    def _inputs(self, model: str, request) -> dict:
        arrays = decode_inputs(request)
        texts = {k: v for k, v in arrays.items() if isinstance(v, list)}
        if not texts:
            return arrays
        if len(arrays) != 1:
            raise InvalidArgument(
                "a BYTES (text) input must be the only input; send either text or tensors"
            )
        return text_inputs(self.rt, model, next(iter(texts.values())), batched=True)

    async def _infer(self, request, holder: Holder | None, send=None) -> kpb.ModelInferResponse:
        """The response to one request. ``send`` (a stream's write) is awaited inside the
        runtime's block: the sequence moves on only once its response went out."""
        model = _need(request.model_name, "model_name")
        self._version(model, request.model_version)
        seq_id, start, end = _sequence(request.parameters)
        inputs = self._inputs(model, request)
        wanted = [o.name for o in request.outputs]
        async with self.rt.sequences.inferring(
            model, seq_id, inputs, start=start, end=end, holder=holder
        ) as res:
            unknown = sorted(set(wanted) - set(res.outputs))
            if unknown:
                raise InvalidArgument(
                    f"requested outputs {[clip(u) for u in unknown[:8]]} unknown; model "
                    f"{clip(model)!r} has {sorted(res.outputs)}"
                )
            resp = kpb.ModelInferResponse(model_name=model, model_version=VERSION, id=request.id)
            fill_outputs(resp, res.outputs, wanted)
            if res.sequence:
                resp.parameters["start"].int64_param = res.start
                resp.parameters["steps_total"].int64_param = res.steps_total
                resp.parameters["revised"].bool_param = res.revised
            self._fits(resp)
            if send is not None:
                await send(kpb.ModelStreamInferResponse(infer_response=resp))
        return resp

    async def ModelInfer(self, request, context):
        annotate(model=clip(request.model_name))
        t0 = time.perf_counter_ns()
        try:
            resp = await self._infer(request, None)
        except BaseException:
            self._record(request.model_name, False, t0)
            raise
        self._record(request.model_name, True, t0, _batch_of(resp))
        return resp

    async def ModelStreamInfer(self, request_iterator, context):
        """Bidirectional: one response per request, in order. A request's error travels in
        ``error_message`` ("CODE_NAME: message") and the stream stays open; the sessions of
        the sequences it drives are leased to it while it is open."""
        fields = call_fields()
        if fields is None:
            fields = {}
        holder = Holder(self.rt.core, lambda: not context.done())
        count = 0
        try:
            while (req := await context.read()) is not grpc.aio.EOF:
                count += 1
                fields["requests"] = count
                t0 = time.perf_counter_ns()
                model = ""
                try:
                    # the request-rate quota: each message after the first
                    if count > 1 and (wait := charge()) is not None:
                        await wait
                    req = checked(req)
                    model = req.model_name
                    fields["request_id"] = clip(req.id)
                    resp = await self._infer(req, holder, context.write)
                except RnnzooError as exc:
                    self._record(model, False, t0)
                    self._message(status_of(exc).name, t0)
                    message = f"{status_of(exc).name}: {exc}"
                    if getattr(req, "id", ""):
                        message += f" (request id {clip(req.id)!r})"
                    await context.write(kpb.ModelStreamInferResponse(error_message=message))
                    continue
                except Exception as exc:  # never end the stream for one request
                    LOG.error("unexpected error", exc_info=exc, extra={"fields": dict(fields)})
                    self._record(model, False, t0)
                    self._message("INTERNAL", t0)
                    await context.write(
                        kpb.ModelStreamInferResponse(
                            error_message=f"{grpc.StatusCode.INTERNAL.name}: internal server "
                            f"error ({type(exc).__name__}); the server log has the details"
                        )
                    )
                    continue
                self._record(model, True, t0, _batch_of(resp))
                self._message("OK", t0)
        finally:
            await holder.release_all()


def _batch_of(resp) -> int:
    return int(resp.outputs[0].shape[0]) if resp.outputs and resp.outputs[0].shape else 1
