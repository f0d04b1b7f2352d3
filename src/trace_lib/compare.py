"""Output comparison of a reference and its variants over the same text, as ``llama-perplexity --kl-divergence``.

The text is packed into chunks of ``ctx`` tokens; as in llama.cpp, only the second half of each chunk is
scored, so every scored token has at least ``ctx/2`` tokens of context. Each batch runs through the
reference once and through every variant; only that batch's logits are alive at a time.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trace_lib.capture.inputs import chunk_batches, pack_texts
from trace_lib.errors import DatasetError, DeviceError
from trace_lib.metrics.outputs import OutputComparison, OutputStats
from trace_lib.models.device import resolve_dtype, synchronize, to_device
from trace_lib.models.load import Loaded, ensure_loaded, load_model
from trace_lib.progress import track
from trace_lib.quant import QuantizationConfig, parse_config, quantize
from trace_lib.results import ResultFile, register_result
from trace_lib.validate import CONTEXT, POSITIVE_INT, check_nonempty, check_variant_spec

RESULT_KIND = "trace.compare"
RESULT_VERSION = 1


@dataclass
class VariantComparison:
    name: str
    model: dict
    stats: OutputStats
    forward_seconds: float

    def to_dict(self) -> dict:
        return {"name": self.name, "model": self.model, "forward_seconds": round(self.forward_seconds, 3),
                "stats": self.stats.to_dict()}


@register_result(RESULT_KIND, RESULT_VERSION)
@dataclass
class CompareResult(ResultFile):
    reference: dict
    variants: list[VariantComparison]
    text: dict
    ctx: int
    n_chunks: int
    reference_forward_seconds: float
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {**self.result_header(),
                "reference": self.reference, "text": self.text, "ctx": self.ctx, "n_chunks": self.n_chunks,
                "reference_forward_seconds": round(self.reference_forward_seconds, 3), "settings": self.settings,
                "variants": [v.to_dict() for v in self.variants]}

    @classmethod
    def from_dict(cls, d: dict) -> CompareResult:
        cls.check_format(d)
        variants = [VariantComparison(v["name"], v["model"], OutputStats.from_dict(v["stats"]), v["forward_seconds"])
                    for v in d["variants"]]
        return cls(d["reference"], variants, d["text"], d["ctx"], d["n_chunks"], d["reference_forward_seconds"],
                   d.get("settings", {}))

    def rows(self) -> list[dict]:
        """One flat row per variant: the headline statistics, for tables."""
        out = []
        for v in self.variants:
            s = v.stats
            out.append({"variant": v.name, "bpw": v.model.get("quant_info", {}).get("bits_per_weight"),
                        "kld_mean": s.kld_mean, "kld_mean_unc": s.kld_mean_unc, "kld_99": s.kld_percentiles["99"],
                        "kld_max": s.kld_percentiles["max"], "same_top": s.same_top_rate,
                        "same_top_unc": s.same_top_unc, "dp_rms": s.dp_rms, "ppl_ratio": s.ppl_ratio,
                        "ppl_ratio_unc": s.ppl_ratio_unc, "ln_ratio": s.ln_ppl_ratio_mean,
                        "ln_ratio_unc": s.ln_ppl_ratio_unc, "ln_prob_cor": s.ln_prob_correlation,
                        "ppl_q": s.ppl_q, "ppl_base": s.ppl_base})
        return out

    def summary(self) -> str:
        lines = [f"Reference {self.reference['name']}: {self.text.get('scored_tokens')} scored tokens "
                 f"({self.n_chunks} chunks of {self.ctx}, second halves), PPL(base) "
                 f"{self.variants[0].stats.ppl_base:.4f}" if self.variants else "no variants"]
        for r in self.rows():
            lines.append(f"  {r['variant']:<18} bpw {r['bpw'] or 0:6.2f}  KLD {r['kld_mean']:.5f} ± {r['kld_mean_unc']:.5f}"
                         f"  99% {r['kld_99']:.4f}  same top {100 * r['same_top']:.2f}%"
                         f"  RMS Δp {100 * r['dp_rms']:.3f}%  PPL ratio {r['ppl_ratio']:.4f} ± {r['ppl_ratio_unc']:.4f}")
        return "\n".join(lines)


def resolve_variant(reference: Loaded, variant: str | QuantizationConfig | Loaded) -> Loaded:
    """A variant given as a config (name, or a mixed-precision config's .json file), or an already-built model,
    or another model spec (loaded on the reference's device, in its dtype)."""
    if isinstance(variant, Loaded):
        return variant
    if isinstance(variant, QuantizationConfig):
        return quantize(reference, variant)
    from trace_lib.errors import QuantizationError

    check_nonempty("variant", variant)
    try:
        return quantize(reference, parse_config(variant))
    except QuantizationError as e:
        is_config_file = str(variant).strip().lower().endswith(".json")  # its errors are the config's, not a model's
        if not is_config_file and Path(variant).expanduser().exists():
            return load_model(variant, dtype=_loadable_dtype(reference), device=reference.device)
        raise e


def _loadable_dtype(reference: Loaded) -> torch.dtype:
    """The reference's dtype where a model can be loaded in it on the reference's device, else float32."""
    try:
        return resolve_dtype(reference.dtype, reference.device)
    except DeviceError:
        return torch.float32


def text_info(texts: list[str], source: str) -> dict:
    return {"source": source, "sha256": hashlib.sha256("\n\n".join(texts).encode()).hexdigest(),
            "chars": sum(len(t) for t in texts)}


def default_texts() -> tuple[list[str], dict]:
    """The built-in English corpus (Python standard-library prose; the same on every machine)."""
    from trace_lib.datasets.corpus import corpus_info, english_corpus

    texts = english_corpus(include_system_texts=False, seed=0)
    info = corpus_info(include_system_texts=False, seed=0)
    return texts, {"source": "english_corpus (python stdlib docstrings and pydoc topics)", "sha256": info["sha256"],
                   "chars": info["chars"]}


def output_statistics(ref: Loaded, variants: list[Loaded], ids: torch.Tensor, batch_size: int = 2
                      ) -> tuple[list[OutputComparison], list[float], float]:
    """Run packed chunks ``ids`` [n, ctx] through the reference once and every variant; score the second half
    of each chunk. Returns the accumulators, each variant's forward seconds and the reference's."""
    ctx = ids.shape[1]
    first = ctx // 2
    keep = ctx - first
    accs = [OutputComparison() for _ in variants]
    secs = [0.0 for _ in variants]
    ref_secs = 0.0
    batches = list(chunk_batches(ids, batch_size))
    with torch.no_grad():
        for batch in track(batches, "comparing outputs"):
            t0 = time.perf_counter()
            ref_logits = ref.model(**to_device(batch, ref.device), use_cache=False, logits_to_keep=keep).logits
            synchronize(ref.device)  # time a GPU's work, not its launch
            ref_secs += time.perf_counter() - t0
            target = batch["input_ids"][:, first:]
            for i, var in enumerate(variants):
                t0 = time.perf_counter()
                var_logits = var.model(**to_device(batch, var.device), use_cache=False, logits_to_keep=keep).logits
                synchronize(var.device)
                secs[i] += time.perf_counter() - t0
                accs[i].update(ref_logits, var_logits, target)
    return accs, secs, ref_secs


def reference_logits(ref: Loaded, ids: torch.Tensor, batch_size: int = 2) -> list[torch.Tensor]:
    """The reference's logits on the scored second half of each chunk, kept for comparing many variants
    without re-running the reference (float32, [batch, ctx - ctx//2, vocab] per batch)."""
    keep = ids.shape[1] - ids.shape[1] // 2
    out = []
    with torch.no_grad():
        for batch in chunk_batches(ids, batch_size):
            out.append(ref.model(**to_device(batch, ref.device), use_cache=False, logits_to_keep=keep).logits.float())
    return out


def variant_output_stats(var: Loaded, ids: torch.Tensor, ref_logits: list[torch.Tensor], batch_size: int = 2
                         ) -> tuple[OutputComparison, float]:
    """llama.cpp statistics of one variant against cached :func:`reference_logits` on the same chunks."""
    first = ids.shape[1] // 2
    acc = OutputComparison()
    secs = 0.0
    with torch.no_grad():
        for batch, ref_l in zip(chunk_batches(ids, batch_size), ref_logits):
            t0 = time.perf_counter()
            var_logits = var.model(**to_device(batch, var.device), use_cache=False,
                                   logits_to_keep=ref_l.shape[1]).logits
            synchronize(var.device)
            secs += time.perf_counter() - t0
            acc.update(ref_l, var_logits, batch["input_ids"][:, first:])
    return acc, secs


def compare_outputs(reference: Loaded | str, variants: list, texts: list[str] | None = None, ctx: int = 512,
                    n_chunks: int = 16, batch_size: int = 2, device: str | torch.device | None = None,
                    dtype: str | torch.dtype | None = None) -> CompareResult:
    """KL-divergence statistics of each variant against the reference over the same packed text; ``device`` and
    ``dtype`` place a reference given as a spec (:func:`~trace_lib.models.load.ensure_loaded`)."""
    CONTEXT.check("ctx", ctx)
    POSITIVE_INT.check("n_chunks", n_chunks)
    POSITIVE_INT.check("batch_size", batch_size)
    if isinstance(variants, str | QuantizationConfig | Loaded):
        variants = [variants]
    for v in variants:  # fail on a bad config name before spending time on loading
        check_variant_spec(v)
    if texts is not None and not any(isinstance(t, str) and t.strip() for t in texts):
        raise DatasetError("texts holds no text: give non-empty strings (or None for the built-in corpus)")
    ref = ensure_loaded(reference, device, dtype)
    if texts is None:
        texts, tinfo = default_texts()
    else:
        tinfo = text_info(texts, "user text")
    ids = pack_texts(ref.tokenizer, texts, ctx, max_sequences=n_chunks)
    built = [resolve_variant(ref, v) for v in variants]
    accs, secs, ref_secs = output_statistics(ref, built, ids, batch_size)
    tinfo["scored_tokens"] = accs[0].n_tokens if accs else 0
    tinfo["tokens"] = int(ids.numel())
    results = [VariantComparison(v.quant.name if v.quant is not None else v.name, v.describe(), acc.result(), s)
               for v, acc, s in zip(built, accs, secs)]
    return CompareResult(ref.describe(), results, tinfo, ctx, len(ids), ref_secs,
                         settings={"batch_size": batch_size, "scored": "second half of each chunk (llama.cpp)"})
