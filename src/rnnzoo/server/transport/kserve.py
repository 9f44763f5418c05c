"""``inference.GRPCInferenceService`` (KServe v2 / Open Inference Protocol with Triton's
extensions) over the same runtime as rnnzoo.v1: validate -> runtime -> response.

Served on the same port as rnnzoo.v1. Requests are decoded by our own deserializers
(``codec.py``: undecodable bytes are INVALID_ARGUMENT), admitted and mapped to status codes
by the same interceptor, from the same one table (``interceptors.STATUS``). Sequences
(``sequence_id``/``sequence_start``/``sequence_end``) are the runtime's
(``runtime/sequences.py``); text is the runtime's (``runtime/text.py``). What this module owns
is the mapping of messages: docs/kserve.md.

Versions: ``model_version`` is honoured everywhere (empty: the newest ready version). New work
goes to a READY version; a sequence keeps the version it started on. ModelStatistics is per
version, with Triton's breakdown: ``queue`` (waiting for an ORT call: the batcher's queue or a
free thread), ``compute_input`` (decoding and checking the request's tensors),
``compute_infer`` (the ORT call(s) the request was in: a batched call's whole duration for each
request in it, as Triton counts), ``compute_output`` (building the response); each count is the
successful requests, ``inference_count`` the inferences (batch rows) and ``execution_count`` the
ORT calls the version's graphs made (a batch of many requests is one).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc

from rnnzoo.contract import Contract
from rnnzoo.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    RnnzooError,
    Unimplemented,
)
from rnnzoo.proto.inference.v2 import grpc_service_pb2 as kpb
from rnnzoo.proto.inference.v2 import model_config_pb2 as mc
from rnnzoo.server.runtime import Runtime, telemetry
from rnnzoo.server.runtime.caller import current
from rnnzoo.server.runtime.redact import clip
from rnnzoo.server.runtime.repository import DRAINING
from rnnzoo.server.runtime.sequences import Holder, SeqKey
from rnnzoo.server.runtime.text import text_inputs
from rnnzoo.server.runtime.versions import key_of

from . import metrics
from .codec import checked
from .convert import public_contract_json
from .guard import charge
from .interceptors import status_of
from .kserve_tensors import OF_DTYPE, decode_inputs, fill_outputs, param_value
from .logs import annotate, call_fields

if TYPE_CHECKING:
    from rnnzoo.server.runtime.control import RepositoryControl

LOG = logging.getLogger("rnnzoo.rpc")
SERVER_NAME = "rnnzoo"
EXTENSIONS = [
    "sequence",
    "model_configuration",
    "model_repository",
    "model_repository(unload_dependents)",
    "statistics",
    "binary_tensor_data",
]
PLATFORM = "onnxruntime_onnx"
# what Triton calls a retired version still running its last requests
INDEX_STATE = {DRAINING: "UNLOADING"}
# request parameters that ask for something rnnzoo does not do: refused, never ignored
_SHM = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")


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


_STAGES = ("success", "queue", "compute_input", "compute_infer", "compute_output")


class ModelStats:
    """One model version's counters for ModelStatistics: (count, ns) per stage."""

    __slots__ = ("fail", "fail_ns", "inferences", "last_ms", "ns", "success")

    def __init__(self) -> None:
        self.success = self.fail = self.fail_ns = self.inferences = self.last_ms = 0
        self.ns = dict.fromkeys(_STAGES, 0)

    def record(self, ok: bool, total_ns: int, batch: int, clock: RequestClock | None) -> None:
        if not ok:
            self.fail += 1
            self.fail_ns += total_ns
            return
        self.success += 1
        self.inferences += batch
        self.last_ms = int(time.time() * 1000)
        ns = self.ns
        ns["success"] += total_ns
        if clock is not None:
            ns["queue"] += clock.timing.queue_ns
            ns["compute_input"] += clock.input_ns
            ns["compute_infer"] += clock.timing.infer_ns
            ns["compute_output"] += clock.output_ns


@dataclass(slots=True)
class RequestClock:
    """One request's server-side breakdown (what ModelStatistics adds up)."""

    timing: telemetry.Timing
    key: str = ""  # the model version's key it ran on
    input_ns: int = 0
    output_ns: int = 0
    # when its response was ready: a stream's write (flow control, the peer's reading) is not
    # the server's time, as a unary response's send is not (it happens after the handler)
    done: int = 0


class KServeServicer:
    """One method per implemented RPC of inference.GRPCInferenceService."""

    def __init__(self, runtime, max_response_bytes: int) -> None:
        self.rt = runtime  # replaced by the loaded runtime (server.load)
        self.max_response_bytes = max_response_bytes
        self.stats: dict[str, ModelStats] = {}  # by model version key
        self.control: RepositoryControl | None = (
            None  # the runtime's RepositoryControl (server.load)
        )
        # version key -> (repository generation, input name -> datatype)
        self._datatypes: dict[str, tuple[int, dict[str, str]]] = {}

    # ---- helpers ---------------------------------------------------------------------------
    def _ready(self) -> bool:
        return isinstance(self.rt, Runtime) and self.rt.ready

    def _key(self, name: str, version: str, live: bool = False) -> str:
        """The key of the version a request goes to (its own, or the newest READY one;
        ``live``: a live sequence's request, which a retired version still takes)."""
        self.rt._check()
        return self.rt.repo.resolve(name, version, live)

    def _fits(self, resp) -> None:
        size = resp.ByteSize()
        if size > self.max_response_bytes:
            raise ResourceExhausted(
                f"the response would be {size} bytes, over this server's message limit of "
                f"{self.max_response_bytes} bytes; send fewer steps per request"
            )

    @staticmethod
    def _message(code: str, t0: int, model: str = "") -> None:
        metrics.request(
            "ModelStreamInfer", "kserve", code, (time.perf_counter_ns() - t0) / 1e9, model
        )

    def _record(self, clock: RequestClock, ok: bool, t0: int, batch: int = 1) -> None:
        if clock.key:  # a version that was resolved: never grow the table from client strings
            stats = self.stats.get(clock.key)
            if stats is None:
                stats = self.stats[clock.key] = ModelStats()
            end = clock.done if ok and clock.done else time.perf_counter_ns()
            stats.record(ok, end - t0, batch, clock if ok else None)

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
        try:
            self._key(name, request.version)
        except RnnzooError:
            return kpb.ModelReadyResponse(ready=False)
        return kpb.ModelReadyResponse(ready=True)

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
        info = self.rt.get_model(self._key(name, request.version))
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
            versions=[str(v) for v in self.rt.repo.served_versions(info.name)],
            platform=PLATFORM,
            inputs=[meta(s) for s in first.inputs],
            outputs=[meta(s) for s in last.outputs],
        )

    async def ModelConfig(self, request, context):
        name = _need(request.name, "name")
        annotate(model=clip(name))
        info = self.rt.get_model(self._key(name, request.version))
        return kpb.ModelConfigResponse(config=self._config(info))

    def _config(self, info) -> mc.ModelConfig:
        first = info.contracts.get("model") or info.contracts["encoder"]
        last = info.contract
        specs = [*first.inputs, *last.outputs]
        batched = all(s.batch_axis == 0 for s in specs)
        opts = self.rt.options

        def dims(spec) -> list[int]:
            return _dims(spec.shape[1:] if batched else spec.shape)

        def dtype(name: str) -> mc.DataType:
            return mc.DataType.Value("TYPE_" + OF_DTYPE.get(name, "INVALID"))

        config = mc.ModelConfig(
            name=info.name,
            platform=PLATFORM,
            backend="onnxruntime",
            version_policy=self._policy(info.name),
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

    def _policy(self, name: str) -> mc.ModelVersionPolicy:
        served = self.rt.repo.served_versions(name)
        return mc.ModelVersionPolicy(specific=mc.ModelVersionPolicy.Specific(versions=served))

    async def ModelStatistics(self, request, context):
        repo = self.rt.repo
        if request.name:
            annotate(model=clip(request.name))
            if request.version:
                keys = [self._key(request.name, request.version)]
            else:
                repo.get(request.name)  # NotFound for an unknown model
                keys = [vs.key for vs in repo.status() if vs.name == request.name]
        else:
            keys = [vs.key for vs in repo.status()]
        resp = kpb.ModelStatisticsResponse()
        for key in keys:
            name, version = repo.split(key)
            entry = repo.entries.get(key)
            s = self.stats.get(key)
            if s is None and entry is None:
                continue  # never served here: nothing to count
            s = s or ModelStats()
            executions = sum(g.executions for g in entry.graphs.values()) if entry else 0
            m = resp.model_stats.add(
                name=name,
                version=str(version),
                last_inference=s.last_ms,
                inference_count=s.inferences,
                execution_count=executions,
            )
            st = m.inference_stats
            st.fail.count, st.fail.ns = s.fail, s.fail_ns
            for stage in _STAGES:
                d = getattr(st, stage)
                d.count, d.ns = s.success, s.ns[stage]
        return resp

    # ---- the model repository ------------------------------------------------------------------
    async def RepositoryIndex(self, request, context):
        if request.repository_name:
            raise NotFound(
                f"no model repository {clip(request.repository_name)!r}: this server has one "
                "(leave repository_name empty)"
            )
        resp = kpb.RepositoryIndexResponse()
        for vs in self.rt.repo.status():
            if request.ready and vs.state != "READY":
                continue
            reason = vs.reason
            if vs.state == DRAINING and self.control is not None:
                left = self.control.sessions_on(vs.key)
                reason = f"retired ({vs.reason}); draining {left} live session(s)"
            resp.models.add(
                name=vs.name,
                version=str(vs.version),
                state=INDEX_STATE.get(vs.state, vs.state),
                reason=reason,
            )
        return resp

    def _repository_call(self, rpc: str, request) -> str:
        name = _need(request.model_name, "model_name")
        annotate(model=clip(name))
        if request.repository_name:
            raise NotFound(
                f"no model repository {clip(request.repository_name)!r}: this server has one "
                "(leave repository_name empty)"
            )
        # no model depends on another here: unload_dependents (tritonclient always sends
        # it) changes nothing; config and file overrides are refused
        given = sorted(clip(k) for k in request.parameters if k != "unload_dependents")
        if given:
            raise InvalidArgument(
                f"{rpc} parameters {given[:8]} are not "
                "supported: put the model's NAME/VERSION/ folder in the repository, then "
                "name the model alone"
            )
        if self.control is None:
            raise FailedPrecondition(f"{rpc}: this server has no model control")
        return name

    async def RepositoryModelLoad(self, request, context):
        name = self._repository_call("RepositoryModelLoad", request)
        await self.control.load(name)
        self.rt.repo.get(name)  # loaded, but no version READY: say why
        return kpb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):
        name = self._repository_call("RepositoryModelUnload", request)
        await self.control.unload(name)
        return kpb.RepositoryModelUnloadResponse()

    # ---- what rnnzoo does not implement, and what to use instead ---------------------------
    async def SystemSharedMemoryStatus(self, request, context):
        if request.name:
            raise NotFound(
                f"no shared memory region {clip(request.name)!r}: rnnzoo registers none "
                "(send tensors in raw_input_contents)"
            )
        return kpb.SystemSharedMemoryStatusResponse()

    async def SystemSharedMemoryRegister(self, request, context):
        raise Unimplemented(_NO_SHM)

    async def SystemSharedMemoryUnregister(self, request, context):
        raise Unimplemented(_NO_SHM)

    async def CudaSharedMemoryStatus(self, request, context):
        if request.name:
            raise NotFound(f"no CUDA shared memory region {clip(request.name)!r}: {_NO_CUDA}")
        return kpb.CudaSharedMemoryStatusResponse()

    async def CudaSharedMemoryRegister(self, request, context):
        raise Unimplemented(_NO_CUDA)

    async def CudaSharedMemoryUnregister(self, request, context):
        raise Unimplemented(_NO_CUDA)

    async def TraceSetting(self, request, context):
        raise Unimplemented(
            "TraceSetting is not implemented: rnnzoo writes one JSON log line per call "
            "(`rnnzoo serve --log-level debug` for successful unary calls too) and serves "
            "Prometheus metrics (`--metrics-port`); use those"
        )

    async def LogSettings(self, request, context):
        raise Unimplemented(
            "LogSettings is not implemented: set the log level when starting the server "
            "(`rnnzoo serve --log-level debug|info|warning|error`)"
        )

    # ---- inference ------------------------------------------------------------------------------
    def _inputs(self, key: str, request) -> dict:
        _refuse_unsupported(request)
        arrays = decode_inputs(request)
        texts = {k: v for k, v in arrays.items() if isinstance(v, list)}
        if not texts:
            self._check_datatypes(key, request)
            return arrays
        if len(arrays) != 1:
            raise InvalidArgument(
                "a BYTES (text) input must be the only input; send either text or tensors"
            )
        return text_inputs(self.rt, key, next(iter(texts.values())), batched=True)

    def _check_datatypes(self, key: str, request) -> None:
        """Each tensor's datatype must be its input's, as Triton requires (no conversion)."""
        generation = self.rt.repo.generation  # any repository change: read them again
        cached = self._datatypes.get(key)
        if cached is None or cached[0] != generation:  # keys are resolved ones: bounded
            info = self.rt.get_model(key)
            first = info.contracts.get("model") or info.contracts["encoder"]
            want = {s.name: OF_DTYPE.get(s.dtype, s.dtype.upper()) for s in first.inputs}
            self._datatypes[key] = (generation, want)
        else:
            want = cached[1]
        for t in request.inputs:
            expected = want.get(t.name)
            if expected is not None and t.datatype != expected:
                raise InvalidArgument(
                    f"input {clip(t.name)!r}: datatype {clip(t.datatype)} does not match the "
                    f"model's {expected}; send {expected} (inputs are not converted)"
                )

    async def _infer(
        self, request, holder: Holder | None, clock: RequestClock, send=None
    ) -> kpb.ModelInferResponse:
        """The response to one request. ``send`` (a stream's write) is awaited inside the
        runtime's block: the sequence moves on only once its response went out."""
        t0 = time.perf_counter_ns()
        model = _need(request.model_name, "model_name")
        seq_id, start, end = _sequence(request.parameters)
        live = seq_id not in (0, "") and not start
        clock.key = key = self._key(model, request.model_version, live)
        inputs = self._inputs(key, request)
        wanted = [o.name for o in request.outputs]
        # a sequence keeps the version it started on; one that names a version is that
        # version's sequence (as Triton's sequence batcher is per version)
        target = key if request.model_version else model
        clock.input_ns = time.perf_counter_ns() - t0
        async with self.rt.sequences.inferring(
            target, seq_id, inputs, start=start, end=end, holder=holder
        ) as res:
            t1 = time.perf_counter_ns()
            unknown = sorted(set(wanted) - set(res.outputs))
            if unknown:
                raise InvalidArgument(
                    f"requested outputs {[clip(u) for u in unknown[:8]]} unknown; model "
                    f"{clip(model)!r} has {sorted(res.outputs)}"
                )
            version = self.rt.repo.split(key)[1] or ""
            if res.sequence:  # the version its session runs on
                version = self._sequence_version(target, seq_id) or version
                clock.key = key_of(model, int(version)) if version else key
            resp = kpb.ModelInferResponse(
                model_name=model, model_version=str(version), id=request.id
            )
            fill_outputs(resp, res.outputs, wanted)
            if res.sequence:
                resp.parameters["start"].int64_param = res.start
                resp.parameters["steps_total"].int64_param = res.steps_total
                resp.parameters["revised"].bool_param = res.revised
            self._fits(resp)
            if send is not None:
                resp.parameters["triton_final_response"].bool_param = True
            clock.done = time.perf_counter_ns()
            clock.output_ns = clock.done - t1
            if send is not None:
                await send(kpb.ModelStreamInferResponse(infer_response=resp))
        return resp

    def _sequence_version(self, model: str, seq_id: int | str) -> int:
        """The model version a sequence's session runs on (0: not known)."""
        caller = current()
        principal = caller.principal if caller is not None and caller.principal else ""
        try:
            return self.rt.session_info(SeqKey(principal, model, seq_id).session_id()).version
        except RnnzooError:
            return 0

    async def ModelInfer(self, request, context):
        annotate(model=clip(request.model_name))
        t0 = time.perf_counter_ns()
        clock = RequestClock(telemetry.Timing())
        telemetry.TIMING.set(clock.timing)
        try:
            resp = await self._infer(request, None, clock)
        except BaseException:
            self._record(clock, False, t0)
            raise
        annotate(version=resp.model_version)
        self._record(clock, True, t0, _batch_of(resp))
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
                clock = RequestClock(telemetry.Timing())
                telemetry.TIMING.set(clock.timing)
                try:
                    # the request-rate quota: each message after the first
                    if count > 1 and (wait := charge()) is not None:
                        await wait
                    req = checked(req)
                    fields["request_id"] = clip(req.id)
                    resp = await self._infer(req, holder, clock, context.write)
                except RnnzooError as exc:
                    self._record(clock, False, t0)
                    self._message(status_of(exc).name, t0, clock.key)
                    message = f"{status_of(exc).name}: {exc}"
                    if getattr(req, "id", ""):
                        message += f" (request id {clip(req.id)!r})"
                    await context.write(_error(message, req))
                    continue
                except Exception as exc:  # never end the stream for one request
                    LOG.error("unexpected error", exc_info=exc, extra={"fields": dict(fields)})
                    self._record(clock, False, t0)
                    self._message("INTERNAL", t0, clock.key)
                    await context.write(
                        _error(
                            f"{grpc.StatusCode.INTERNAL.name}: internal server error "
                            f"({type(exc).__name__}); the server log has the details",
                            req,
                        )
                    )
                    continue
                self._record(clock, True, t0, _batch_of(resp))
                self._message("OK", t0, clock.key)
        finally:
            await holder.release_all()


_NO_SHM = (
    "system shared memory is not supported: send tensors in raw_input_contents (what "
    "tritonclient does without set_shared_memory)"
)
_NO_CUDA = "rnnzoo serves on CPU and has no CUDA shared memory: send tensors in raw_input_contents"


def _error(message: str, req) -> kpb.ModelStreamInferResponse:
    """A stream's in-band error, final for its request as Triton marks every response."""
    resp = kpb.ModelStreamInferResponse(error_message=message)
    r = resp.infer_response
    r.id = getattr(req, "id", "")
    r.model_name = getattr(req, "model_name", "")
    r.parameters["triton_final_response"].bool_param = True
    return resp


def _refuse_unsupported(request) -> None:
    """Classification, shared memory, priorities and request timeouts are refused, never
    silently ignored."""
    params = request.parameters
    if "priority" in params and param_value(params["priority"]):
        raise InvalidArgument(
            f"priority {param_value(params['priority'])!r} is not supported: rnnzoo has no "
            "priority levels (a sequence's requests run in order, batched across sessions); "
            "send the request without priority"
        )
    if "timeout" in params and param_value(params["timeout"]):
        raise InvalidArgument(
            "the request parameter timeout is not supported: set a gRPC deadline on the call "
            "instead (tritonclient's client_timeout)"
        )
    for t in request.inputs:
        shm = [k for k in _SHM if k in t.parameters]
        if shm:
            raise InvalidArgument(f"input {clip(t.name)!r} names shared memory: {_NO_SHM}")
    for o in request.outputs:
        if "classification" in o.parameters:
            n = param_value(o.parameters["classification"])
            raise InvalidArgument(
                f"output {clip(o.name)!r} asks for classification (class_count={n!r}): rnnzoo "
                "returns whole output tensors; request the output without class_count and "
                "take the top classes on the client"
            )
        if any(k in o.parameters for k in _SHM):
            raise InvalidArgument(f"output {clip(o.name)!r} names shared memory: {_NO_SHM}")


def _batch_of(resp) -> int:
    return int(resp.outputs[0].shape[0]) if resp.outputs and resp.outputs[0].shape else 1
