"""Where a variant's damage enters: activation patching, attribution patching and weight-error attribution;
and attribution graphs on transcoders, with what quantization does to them.

:func:`localize` runs everything on a reference and a variant; the pieces work on token-level inputs
(:class:`MetricBatch`) for any two models that share a tokenizer and a block structure. Definitions and
formulas: ``docs/localize.md`` and each module's docstring. Attribution graphs (:func:`attribute`,
:func:`graph_diff`, transcoders): ``docs/graph.md``.
"""

from trace_lib.attribution.atp import AtPResult, attribution_patch, false_negative_rate, spearman
from trace_lib.attribution.components import Component
from trace_lib.attribution.decompose import Decomposition, decompose
from trace_lib.attribution.graph import MAX_GRAPH_TOKENS, Graph, attribute
from trace_lib.attribution.graph_diff import GraphDiff, graph_diff
from trace_lib.attribution.graph_json import graph_to_json, validate_graph_json, write_graph_files
from trace_lib.attribution.graph_prune import PruneResult, graph_scores, prune_graph
from trace_lib.attribution.graph_targets import CustomTarget, LogitTarget, logit_difference
from trace_lib.attribution.inputs import Direction, fit_direction, make_batches, reference_refusals
from trace_lib.attribution.localize import LocalizeResult, localize
from trace_lib.attribution.metric import (
           Gap,
           Metric,
           MetricBatch,
           build_batch,
           gap_interval,
           metric_values,
           pack_batch,
)
from trace_lib.attribution.patching import PatchResult, PatchRun, activation_patch
from trace_lib.attribution.transcoder import Transcoder, TranscoderSet, load_transcoder_set
from trace_lib.attribution.transcoder_build import TranscoderBuild, TranscoderBuildConfig, build_transcoders
from trace_lib.attribution.transcoder_train import train_transcoders
from trace_lib.attribution.weights import WeightResult, differing_linears, first_order, weight_attribution

__all__ = ["MAX_GRAPH_TOKENS", "AtPResult", "Component", "CustomTarget", "Decomposition", "Direction", "Gap", "Graph",
           "GraphDiff", "LocalizeResult", "LogitTarget", "Metric", "MetricBatch", "PatchResult", "PatchRun",
           "PruneResult", "Transcoder", "TranscoderBuild", "TranscoderBuildConfig", "TranscoderSet", "WeightResult", "activation_patch", "attribute",
           "attribution_patch", "build_batch", "build_transcoders", "decompose", "differing_linears", "false_negative_rate", "first_order",
           "fit_direction", "gap_interval", "graph_diff", "graph_scores", "graph_to_json", "load_transcoder_set",
           "localize", "logit_difference", "make_batches", "metric_values", "pack_batch", "prune_graph",
           "reference_refusals", "spearman", "train_transcoders", "validate_graph_json", "weight_attribution",
           "write_graph_files"]
