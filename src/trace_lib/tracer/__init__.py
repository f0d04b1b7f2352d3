"""ModelTracer: per-layer traces of activations, attention, logit lens, quantization error and KV cache.

See :mod:`trace_lib.tracer.tracer` for the tracer (the driver), :mod:`~trace_lib.tracer.recorder` for what a traced
pass records, :mod:`~trace_lib.tracer.result` for the results' data, and one module per trace type.
"""

from trace_lib.tracer.activations import ActivationRecord, ActivationTrace, Anomaly, TensorStats, tensor_stats
from trace_lib.tracer.attention import AttentionWeightTrace
from trace_lib.tracer.config import AttentionTraceConfig, ModelTracerConfig, TracerInputError
from trace_lib.tracer.kv_cache import KvCacheSession, KvCacheStep
from trace_lib.tracer.logit_lens import LogitLensTrace, TokenLogitEvolution
from trace_lib.tracer.quant_error import LayerQuantError, QuantErrorTrace
from trace_lib.tracer.recorder import TraceRecorder
from trace_lib.tracer.result import ForwardTrace, GenerationTrace, TracerResult
from trace_lib.tracer.tracer import ModelTracer

__all__ = ["ActivationRecord", "ActivationTrace", "Anomaly", "AttentionTraceConfig", "AttentionWeightTrace",
           "ForwardTrace", "GenerationTrace", "KvCacheSession", "KvCacheStep", "LayerQuantError", "LogitLensTrace",
           "ModelTracer", "ModelTracerConfig", "QuantErrorTrace", "TensorStats", "TokenLogitEvolution",
           "TraceRecorder", "TracerInputError", "TracerResult", "tensor_stats"]
