"""``trace graph``: the attribution graph of one prompt on the reference, optionally a variant's graph read
through the SAME transcoders and the diff of the two, as a ``trace.graph`` result.

:func:`run_graph` loads the model and the transcoders (a built set from the cache, :mod:`.transcoder_build`,
or a circuit-tracer ``transcoder_set`` folder), checks the prompt, the targets and the transcoders before any
long work, attributes (:func:`~trace_lib.attribution.graph.attribute`), writes the graph JSON files in
circuit-tracer's frontend schema (:func:`~trace_lib.attribution.graph_json.write_graph_files`) and returns a
:class:`GraphResult`: prompt, targets, scores, node and edge counts, the pruned graphs (for the HTML page),
and with a variant the diff's Jaccards and the top lost / new nodes and edges.

Targets: ``top`` (the salient logits, circuit-tracer's default), one token (a one-token string), or
``refusal``: the prompt is chat-formatted (refusal is decided at the post-instruction position) and the single
logit node is ``logit(r) - logit(c)``, r the first token of the reference's own greedy reply (which trace's
refusal classifier must call a refusal, as :func:`~trace_lib.attribution.inputs.reference_refusals` does for
``trace localize``) and c the first token of the compliance opening
:data:`~trace_lib.attribution.metric.COMPLIANCE` -- the first tokens of the two continuations the refusal
metric (``refusal-logprob``) compares.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trace_lib.errors import GraphError, TranscoderError
from trace_lib.results import ResultFile, register_result

RESULT_KIND = "trace.graph"
RESULT_VERSION = 1
BUILD_TIME_NOTE = "the time of `trace graph build` on this model has not been measured yet"


@register_result(RESULT_KIND, RESULT_VERSION)
@dataclass
class GraphResult(ResultFile):
    """What ``trace graph`` computed. ``reference`` / ``variant``: ``{"scores", "counts", "file", "nodes",
    "links"}`` (the pruned graph in circuit-tracer's node and link form); ``diff``: ``GraphDiff.to_dict``."""

    model: dict
    prompt: str
    tokens: list[str]
    target: dict
    targets: list[dict]
    transcoders: dict
    settings: dict
    reference: dict
    variant: dict | None = None
    variant_model: dict | None = None
    diff: dict | None = None
    seconds: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {**self.result_header(), **{k: getattr(self, k) for k in self.__dataclass_fields__}}

    @classmethod
    def from_dict(cls, d: dict) -> GraphResult:
        cls.check_format(d)
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def summary(self, n: int = 5) -> str:
        def side(name: str, g: dict) -> str:
            s, c = g["scores"], g["counts"]
            return (f"{name}: replacement score {s['replacement']:.3f}, completeness {s['completeness']:.3f}, "
                    f"{c['n_active_features']} active features, {c['n_nodes_kept']} nodes and {c['n_links']} edges "
                    f"kept")

        tgt = ", ".join(f"{t['label']!r} ({t['weight']:.3f})" for t in self.targets)
        lines = [f"{self.model['name']}: graph of {len(self.tokens)} tokens, target {self.target['mode']}: {tgt}",
                 side("reference", self.reference)]
        if self.variant is not None and self.diff is not None:
            d = self.diff
            lines.append(side(f"variant {self.variant_model['name']}", self.variant))
            lines.append(f"diff: node Jaccard {d['node_jaccard']:.3f}, edge Jaccard {d['edge_jaccard']:.3f}; nodes "
                         f"lost {d['n_nodes']['lost']}, new {d['n_nodes']['new']}; edges lost {d['n_edges']['lost']}, "
                         f"new {d['n_edges']['new']}")
            for key in ("edges_lost", "edges_new"):
                for c in d[key][:n]:
                    lines.append(f"  {key.replace('_', ' ')}: {c['id']} (influence {c['ref']:.3g} -> {c['var']:.3g})")
        return "\n".join(lines)


def _side(graph, out_dir: Path, slug: str, node_threshold: float, edge_threshold: float) -> dict:
    from trace_lib.attribution.graph_json import graph_to_json, write_graph_files
    from trace_lib.attribution.graph_prune import graph_scores, prune_graph

    pr = prune_graph(graph, node_threshold, edge_threshold)
    path = write_graph_files(graph, out_dir, slug=slug, node_threshold=node_threshold,
                             edge_threshold=edge_threshold, prune=pr)
    data = graph_to_json(graph, slug=slug, node_threshold=node_threshold, edge_threshold=edge_threshold, prune=pr)
    info = data["metadata"]["trace_info"]
    replacement, completeness = graph_scores(graph)
    return {"scores": {"replacement": replacement, "completeness": completeness},
            "counts": {k: info[k] for k in ("n_features", "n_active_features", "n_nodes_kept", "n_links")},
            "file": str(path), "nodes": data["nodes"], "links": data["links"]}


def load_transcoders_for(loaded, folder: str | Path | None):
    """The transcoders ``trace graph`` reads: ``folder`` (circuit-tracer layout; with a trace manifest also
    checked against the model and checksums) or the newest complete build in the cache; refuses a set made for
    another model, of another width or with missing layers."""
    from trace_lib.attribution.transcoder import load_transcoder_set
    from trace_lib.attribution.transcoder_build import built_transcoders, model_hash, read_build

    if folder is None:
        build = built_transcoders(loaded)
        if build is None:
            raise TranscoderError(f"no transcoders for {loaded.name} yet: run `trace graph build --model "
                                  f"{loaded.spec or loaded.name}` once ({BUILD_TIME_NOTE}), or give "
                                  "--transcoders DIR (circuit-tracer's transcoder_set layout)")
        return build.load(), str(build.folder)
    build = read_build(folder)
    if build is not None:
        if build.manifest.get("model_hash") != model_hash(loaded):
            raise TranscoderError(f"the transcoders in {folder} were built for {build.manifest.get('model')} "
                                  f"(hash {build.manifest.get('model_hash')}), not {loaded.name}")
        if not build.complete:
            missing = sorted(set(range(loaded.n_layers)) - set(build.layers))
            raise TranscoderError(f"the transcoders in {folder} lack layers {missing}: finish them with "
                                  f"`{build.build_command}`")
        tcs = build.load()
    else:
        tcs = load_transcoder_set(folder)
    tcs.check_fits(loaded)
    return tcs, str(folder)


def refusal_target(loaded, prompt: str):
    """The ``refusal`` target of a chat prompt (module docstring): ``(CustomTarget, info)``."""
    from trace_lib.attribution.graph_targets import logit_difference, token_label
    from trace_lib.attribution.inputs import reference_refusals
    from trace_lib.attribution.metric import COMPLIANCE

    if loaded.tokenizer is None:
        raise GraphError("--target refusal needs the model's tokenizer (the refusal and compliance openings)")
    refusals = reference_refusals(loaded, [prompt], max_new_tokens=24, batch_size=1)
    reply = refusals.replies[0]
    if not refusals.refused[0]:
        raise GraphError(f"the reference does not refuse this prompt (its reply starts {reply[:60]!r}), so a "
                         "refusal target is undefined: give a prompt it refuses, or --target top")
    r = loaded.tokenizer(reply, add_special_tokens=False)["input_ids"]
    c = loaded.tokenizer(COMPLIANCE, add_special_tokens=False)["input_ids"]
    if not r or not c or r[0] == c[0]:
        raise GraphError("the refusal reply and the compliance opening start with the same token: no logit "
                         "difference to explain")
    info = {"mode": "refusal", "refusal_reply": reply, "refusal_token": token_label(loaded, r[0]),
            "compliance": COMPLIANCE, "compliance_token": token_label(loaded, c[0])}
    return logit_difference(loaded, r[0], c[0]), info


def chat_ids(loaded, prompt: str) -> list[int]:
    """The prompt as the chat template formats it (the generation prompt appended), as trace's refusal
    metric reads it."""
    from trace_lib.capture.inputs import format_prompts

    tok = loaded.tokenizer
    text = format_prompts(tok, [prompt], bool(getattr(tok, "chat_template", None)))[0]
    return tok(text, add_special_tokens=not getattr(tok, "chat_template", None))["input_ids"]


def run_graph(model: str, prompt: str, *, variant: str | None = None, target: str = "top",
              transcoders: str | Path | None = None, max_feature_nodes: int | None = None,
              node_threshold: float = 0.8, edge_threshold: float = 0.98, out_dir: str | Path = "trace-out",
              device: str = "auto", dtype: str = "auto", log=lambda s: None) -> GraphResult:
    """The reference's graph, and with ``variant`` the variant's on the same transcoders and targets plus their
    diff; files written to ``out_dir`` (module docstring)."""
    from trace_lib.attribution.graph import MAX_GRAPH_TOKENS, _tokenize, attribute
    from trace_lib.attribution.graph_targets import _string_ids
    from trace_lib.attribution.replacement import check_family
    from trace_lib.models import load_model

    if not prompt.strip():
        raise GraphError("the prompt is empty: an attribution graph needs at least one token")
    for name, v in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0 < v <= 1:
            raise GraphError(f"{name} must be a number in (0, 1], not {v}")
    t0 = time.perf_counter()
    loaded = load_model(model, dtype=dtype, device=device)
    check_family(loaded)
    tcs, tc_folder = load_transcoders_for(loaded, transcoders)
    spec: Any = None
    target_info: dict = {"mode": target}
    graph_prompt: Any = prompt
    if target == "refusal":
        graph_prompt = chat_ids(loaded, prompt)
        _tokenize(loaded, graph_prompt, MAX_GRAPH_TOKENS)  # the length limit before generating
        spec, target_info = refusal_target(loaded, prompt)
    elif target != "top":
        spec = _string_ids(loaded, [target])
        target_info = {"mode": "token", "token": target}
    _tokenize(loaded, graph_prompt, MAX_GRAPH_TOKENS)
    seconds = {"load": time.perf_counter() - t0}
    t0 = time.perf_counter()
    log("attributing the reference's graph")
    g_ref = attribute(loaded, tcs, graph_prompt, targets=spec, max_feature_nodes=max_feature_nodes)
    seconds["reference"] = time.perf_counter() - t0
    g_var = vloaded = None
    if variant is not None:
        from trace_lib.compare import resolve_variant

        t0 = time.perf_counter()
        log(f"loading {variant} and attributing its graph on the same transcoders")
        vloaded = resolve_variant(loaded, variant)
        g_var = attribute(vloaded, tcs, g_ref.tokens, targets=g_ref.target_spec(),
                          max_feature_nodes=max_feature_nodes)
        g_var.prompt = g_ref.prompt
        seconds["variant"] = time.perf_counter() - t0
    return graph_result(loaded, tcs, g_ref, g_var, prompt=prompt, target_info=target_info, out_dir=out_dir,
                        transcoder_folder=tc_folder, model_spec=model, variant=variant,
                        variant_loaded=vloaded, node_threshold=node_threshold, edge_threshold=edge_threshold,
                        max_feature_nodes=max_feature_nodes, seconds=seconds)


def graph_result(loaded, tcs, g_ref, g_var=None, *, prompt: str, target_info: dict, out_dir: str | Path,
                 transcoder_folder: str = "", model_spec: str = "", variant: str | None = None,
                 variant_loaded=None, node_threshold: float = 0.8, edge_threshold: float = 0.98,
                 max_feature_nodes: int | None = None, seconds: dict | None = None) -> GraphResult:
    """Write the graph files of ``g_ref`` (and ``g_var``) into ``out_dir`` and assemble the result."""
    from trace_lib.attribution.graph_diff import graph_diff

    out = Path(out_dir)
    ref = _side(g_ref, out, "graph-reference", node_threshold, edge_threshold)
    var = diff = var_model = None
    if g_var is not None:
        var = _side(g_var, out, "graph-variant", node_threshold, edge_threshold)
        diff = graph_diff(g_ref, g_var, node_threshold, edge_threshold).to_dict(top=10)
        var_model = {"name": getattr(variant_loaded, "name", None) or variant or "variant", "spec": variant,
                     "content_hash": getattr(variant_loaded, "content_hash", None)}
    return GraphResult(
        model={"name": loaded.name, "spec": model_spec or loaded.name, "content_hash": loaded.content_hash},
        prompt=prompt, tokens=list(g_ref.token_strs), target=target_info,
        targets=[{"label": t.label, "vocab_idx": t.vocab_idx, "weight": t.weight} for t in g_ref.targets],
        transcoders={"folder": transcoder_folder, "scan": tcs.scan, "width": tcs[0].d_transcoder,
                     "layers": len(tcs)},
        settings={"node_threshold": node_threshold, "edge_threshold": edge_threshold,
                  "max_feature_nodes": max_feature_nodes, "chat_formatted": target_info.get("mode") == "refusal"},
        reference=ref, variant=var, variant_model=var_model, diff=diff, seconds=dict(seconds or {}))
