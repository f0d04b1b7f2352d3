"""One variant against the reference side: :func:`audit_variant` runs the variant over the test prompts and the
KL text, and compares its SAE codes, directions and outputs with the :class:`ReferenceSide`'s."""

from __future__ import annotations

import time

import torch

from trace_lib.audit.records import DirectionAudit, FeatureAudit, HookStats, VariantAudit
from trace_lib.audit.reference import ReferenceSide
from trace_lib.capture.prompts import PromptActs, capture_prompts
from trace_lib.compare import variant_output_stats
from trace_lib.errors import SAEError
from trace_lib.fingerprint import reduce_prompt_acts
from trace_lib.metrics.damage import feature_damage
from trace_lib.metrics.directions import compare_directions, diff_in_means
from trace_lib.metrics.features import CPFR, ActivationMuting, FeatureDrift, FeatureSmearing
from trace_lib.metrics.outputs import OutputStats
from trace_lib.metrics.readout import encode_codes, encoder_readout, prompt_activation_kept
from trace_lib.models.load import Loaded
from trace_lib.probes import audit_probe


def top_examples(ref: PromptActs, mask: torch.Tensor, codes_ref: torch.Tensor, codes_var: torch.Tensor, column: int,
                 tokenizer, n: int = 5) -> list[dict]:
    """The reference's top-activating tokens of one feature, with the variant's activation on the same tokens."""
    if tokenizer is None or ref.token is None:
        return []
    idx = mask.nonzero().squeeze(1)
    vals = codes_ref[:, column]
    top = vals.topk(min(n, len(vals))).indices
    out = []
    for t in top.tolist():
        if vals[t] <= 0:
            break
        left, tok, right = ref.context(int(idx[t]), tokenizer)
        out.append({"prompt": int(ref.prompt[idx[t]]), "position": int(ref.position[idx[t]]), "left": left,
                    "token": tok, "right": right, "ref": float(vals[t]), "variant": float(codes_var[t, column])})
    return out


def audit_variant(ref: ReferenceSide, variant: Loaded) -> VariantAudit:
    """Audit one variant against the reference side: its forward passes (the test prompts, the KL text), then
    every comparison (:func:`compare_variant`), with the timings."""
    t0 = time.perf_counter()
    name = variant.quant.name if variant.quant is not None else variant.name
    var_acts = capture_prompts(variant, list(ref.texts), ref.hooks, batch_size=ref.batch_size,
                               description=f"{name} prompts")
    prompt_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    acc, kl_s = variant_output_stats(variant, ref.kl_ids, ref.ref_logits)
    t2 = time.perf_counter()
    va = compare_variant(ref, name, variant.describe(), var_acts, acc.result())
    va.timing = {"prompt_forward_s": round(prompt_s, 3), "kl_forward_s": round(kl_s, 3),
                 "reference_prompt_forward_s": round(ref.prompt_forward_s, 3),
                 "prompt_tokens": int(var_acts.prompt.numel()), "metrics_s": round(time.perf_counter() - t2, 3),
                 "total_s": round(time.perf_counter() - t0, 3), "kl_s": round(t2 - t1, 3)}
    return va


def compare_variant(ref: ReferenceSide, name: str, model_info: dict, var: PromptActs,
                    outputs: OutputStats | None = None, n_examples: int = 5) -> VariantAudit:
    """All feature- and direction-level comparisons of a variant's activations ``var`` (on the reference side's
    prompts) against the reference side; the reference's codes are read from ``ref``, never recomputed."""
    hooks, mask, fp_mask, threshold, fp = ref.hooks, ref.mask, ref.fp_mask, ref.threshold, ref.fingerprint
    if var.acts[hooks[0]].shape != ref.acts.acts[hooks[0]].shape:
        raise SAEError("reference and variant activations cover different tokens; they must read the same prompts")
    feats_var, resid_var = reduce_prompt_acts(var, ref.saes, fp.metadata.get("positions", "post_instruction"),
                                              fp.metadata.get("reduce", "max"))
    features: list[FeatureAudit] = []
    hook_stats: dict[str, HookStats] = {}
    for h, sae in ref.saes.items():
        whole = CPFR(threshold).compute(ref.codes[h], encode_codes(sae, var.acts[h][mask]))
        recs = ref.fp_features[h]
        per = whole.per_feature[~torch.isnan(whole.per_feature)]
        hs = HookStats(tokens=int(mask.sum()), cpfr_all_features=whole.score,
                       cpfr_median_all_features=float(per.median()) if len(per) else float("nan"),
                       active_features=whole.num_active, degraded_features_all=len(whole.degraded_features),
                       fingerprint_tokens=int(fp_mask.sum()))
        if recs:
            ids = ref.fp_ids(h)
            col = {fid: i for i, fid in enumerate(ids)}
            fp_ref, fp_var = ref.fp_codes[h], encode_codes(sae, var.acts[h][fp_mask])
            sub_ref, sub_var = fp_ref[:, ids], fp_var[:, ids]
            fp_cpfr = CPFR(threshold).compute(sub_ref, sub_var, feature_ids=ids)
            readout = CPFR(threshold).compute(ref.fp_readouts[h], encoder_readout(sae, var.acts[h][fp_mask], ids),
                                              feature_ids=ids)
            drift = FeatureDrift().compute(sub_ref, sub_var, feature_ids=ids)
            mute = ActivationMuting().detect_muting(sub_ref, sub_var, feature_ids=ids)
            muted = set(mute.muted_features)
            smear = FeatureSmearing().detect_smearing(sub_ref, sub_var, feature_ids=ids)
            hs.smeared_pairs, hs.smeared = smear.num_smeared_pairs, smear.pairs[:20]
            dmg = feature_damage(sub_ref, sub_var)
            for f in recs:
                r, i = f.record, col[f.record.feature]
                rows = ref.safety_rows if f.kind == "safety" else torch.arange(ref.prompt_codes[h].shape[0])
                features.append(FeatureAudit(
                    hook=h, feature=r.feature, kind=f.kind, category=f.categories, train_auroc=r.auroc,
                    cpfr=float(fp_cpfr.per_feature[i]),
                    relative_mean_change=float(drift.relative_mean_change[i]),
                    normalized_wasserstein=float(drift.normalized_wasserstein[i]),
                    firing_rate_ref=float(drift.firing_rate_ref[i]), firing_rate_variant=float(drift.firing_rate_quant[i]),
                    token_muting_rate=float(mute.per_feature_token_muting[i]), muted=r.feature in muted,
                    prompt_activation_kept=prompt_activation_kept(ref.prompt_codes[h], feats_var[h], rows, r.feature),
                    readout_cpfr=float(readout.per_feature[i]), damage=dmg.label[i], mass_ratio=dmg.mass_ratio[i],
                    mass_kept=dmg.kept[i], on_target=dmg.on_target[i], firing_jaccard=dmg.jaccard[i]))
        # For the most degraded fingerprint features here: where the reference fires most, and the variant there.
        worst = sorted((f for f in features if f.hook == h), key=lambda f: f.cpfr)[:n_examples]
        hs.examples = {str(f.feature): top_examples(ref.acts, fp_mask, fp_ref, fp_var, f.feature,
                                                    ref.reference.tokenizer) for f in worst} if recs else {}
        hook_stats[h] = hs
    directions = []
    for d in ref.directions:
        si, bi = ref.groups[d.category]
        pos, neg = resid_var[d.hook][si], resid_var[d.hook][bi]
        cmp = compare_directions(d.direction, diff_in_means(pos, neg), acts_ref=(d.acts_safety, d.acts_baseline),
                                 acts_quant=(pos, neg))
        directions.append(DirectionAudit.of(d.category, d.hook, cmp))
    fp_eval = fp.evaluate_codes(feats_var, resid_var, ref.groups)
    probes = []
    for p in ref.probes:  # the reference basis's probes, read through both models on the same test prompts
        si, bi = ref.groups[p.category]
        r, v = ref.prompt_resid[p.hook], resid_var[p.hook]
        probes.append(audit_probe(p, r[si], r[bi], v[si], v[bi], seed=ref.seed))
    return VariantAudit(name, model_info, features, hook_stats, directions, fp_eval, outputs,
                        degradation_threshold=threshold, probes=probes)
