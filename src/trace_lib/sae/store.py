"""SAEs for a model, trained once and cached: keyed by model hash, hook and training config.

``get_or_train_saes(loaded, hooks)`` returns ``{hook_name: SAE}``. Missing SAEs are trained on the
reference's activations (collected for all missing hooks in one pass, see ``capture.buffer``) over a mix
of English text and chat-formatted prompts (the train splits of the built-in datasets), checkpointed so an
interrupted run resumes, evaluated with SAELens's metrics on held-out tokens, and saved in SAELens format
under ``$TRACE_CACHE/saes/<model hash>/<key>/<hook>/`` with the metrics in ``cfg.json``'s ``trace`` entry.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from trace_lib.cache import atomic_write_json, cache_dir, stable_hash
from trace_lib.capture.buffer import collect_activations, token_key
from trace_lib.sae.io import load_sae, save_sae
from trace_lib.sae.model import SAE
from trace_lib.sae.plan import TRAINING_DATASETS, SAEDataPlan, plan_batches
from trace_lib.sae.quality import evaluate_sae
from trace_lib.sae.splice import ce_loss_with_sae
from trace_lib.sae.training import SAETrainingConfig, train_sae

__all__ = ["TRAINING_DATASETS", "SAEDataPlan", "default_hooks", "default_training_config", "get_or_train_saes",
           "sae_folder"]

DEFAULT_N_HOOKS = 6
MASSIVE_FACTOR = 10.0
MASSIVE_RULE = f"tokens whose residual norm exceeds {MASSIVE_FACTOR:g}x the median norm are left out"


def drop_massive_activations(x: torch.Tensor, factor: float = MASSIVE_FACTOR) -> tuple[torch.Tensor, int]:
    """Leave out tokens with *massive activations* (Sun et al. 2024, "Massive Activations in Large Language
    Models"): a few attention-sink tokens whose residual norm is ~100x the rest (25,000 vs a median of 170 at
    layer 15 of SmolLM2). Two such tokens in 89k hold a third of the total variance, so they would dominate
    an SAE's loss and its explained variance. Returns the kept rows and how many were dropped."""
    norms = x.norm(dim=1)
    keep = norms <= factor * norms.median()
    return x[keep], int((~keep).sum())


def default_hooks(loaded, n_hooks: int = DEFAULT_N_HOOKS) -> list[str]:
    """The residual stream after ``n_hooks`` blocks spread evenly over the depth, ``round(n * k / (n_hooks + 1))``
    for k = 1..n_hooks (layers 4, 9, 13, 17, 21, 26 of SmolLM2's 30): the seed reads features "across the depth
    of the model", and refusal and other behaviour directions are readable from early-middle layers on
    (Arditi et al. 2024). The first and last blocks are left out: the embedding and the unembedding's input."""
    n = loaded.n_layers
    layers = sorted({min(round(n * k / (n_hooks + 1)), n - 1) for k in range(1, n_hooks + 1)})
    return [f"blocks.{i}.hook_resid_post" for i in layers]


def default_training_config() -> SAETrainingConfig:
    """ReLU SAE, 4x expansion, L1 coefficient steered to mean L0 58, decoder refit after training.

    A ReLU code ``max(0, W_enc x + b_enc)`` is continuous in the residual stream, so a tiny perturbation
    (FP16 rounding) makes a tiny change in every latent; a TopK or JumpReLU code jumps where a latent crosses
    the k-th value or its threshold, which puts a floor under CPFR that is not the variant's doing
    (docs/metrics.md, "the CPFR noise floor"). The L0 target replaces TopK's k as the sparsity knob, and the
    least-squares decoder refit pays back the L1 penalty's shrinkage. On the default model this meets the
    quality bar at the default hooks within the time budget (figures in docs/sae.md)."""
    return SAETrainingConfig(architecture="relu", expansion_factor=4, batch_size=1024, lr=2e-3, epochs=3,
                             l1_coefficient=0.8, target_l0=58, refit_decoder=True)


def sae_folder(loaded, cfg: SAETrainingConfig, plan: SAEDataPlan) -> Path:
    key = stable_hash({"cfg": dataclasses.asdict(cfg), "plan": plan.to_dict()})
    return cache_dir("saes", loaded.content_hash, key)


def get_or_train_saes(loaded, hooks: Sequence[str] | None = None, cfg: SAETrainingConfig | None = None,
                      plan: SAEDataPlan | None = None, progress: bool = True, shipped: bool = True
                      ) -> dict[str, SAE]:
    """Cached SAEs for ``hooks`` (default :func:`default_hooks`), training the missing ones.

    With ``shipped=True`` and the default config and plan, the model's shipped pack
    (:mod:`trace_lib.sae.shipped`) provides the hooks it has; ``shipped=False`` trains them here instead."""
    hooks = [loaded.arch.resolve(h) for h in (hooks or default_hooks(loaded))]
    saes: dict[str, SAE] = {}
    if shipped and cfg is None and plan is None:
        from trace_lib.sae.shipped import shipped_pack

        pack = shipped_pack(loaded)
        if pack is not None:
            saes.update(pack.load([h for h in hooks if h in pack.hooks]))
    cfg = cfg or default_training_config()
    plan = plan or SAEDataPlan()
    folder = sae_folder(loaded, cfg, plan)
    missing = []
    for h in hooks:
        if h in saes:
            continue
        if (folder / h / "cfg.json").is_file():
            saes[h] = load_sae(folder / h)
        else:
            missing.append(h)
    if not missing:
        return {h: saes[h] for h in hooks}
    data = plan_batches(loaded, plan)
    acts = collect_activations(loaded, missing, data.train, description="collecting SAE training activations")
    held = None
    if data.heldout is not None:
        held = collect_activations(loaded, missing, data.heldout, description="collecting held-out activations")
    for h in missing:
        x, n_massive = drop_massive_activations(acts.pop(h))
        if held is None:  # the "english" plan: a seeded slice of the training activations
            g = torch.Generator().manual_seed(plan.seed)
            perm = torch.randperm(len(x), generator=g)
            held_out, train = x[perm[: plan.eval_tokens]], x[perm[plan.eval_tokens:]]
            n_massive_held = 0
        else:
            train = x
            held_out, n_massive_held = drop_massive_activations(held.pop(h))
        del x
        t0 = time.perf_counter()
        sae, log = train_sae(train, cfg, hook_name=h, checkpoint_dir=folder / f".checkpoint-{h}", progress=progress,
                             model_name=loaded.name)
        seconds = time.perf_counter() - t0
        quality = {k: v for k, v in evaluate_sae(sae, [held_out]).items() if k != "feature_frequencies"}
        quality.update(ce_loss_with_sae(loaded, sae, h, data.ce))
        sae.cfg.metadata.update({"quality": quality, "training": {
            "tokens": int(len(train)), "held_out_tokens": int(len(held_out)), "seconds": round(seconds, 1),
            "held_out": "corpus heldout split" if held is not None else "random slice of the training tokens",
            "massive_activation_tokens_dropped": n_massive + n_massive_held, "massive_activation_rule": MASSIVE_RULE,
            "steps": log.get("steps"), "tokens_per_s": log.get("tokens_per_s"), "config": dataclasses.asdict(cfg),
            "data": plan.to_dict(), "data_tokens_key": token_key(data.train), "corpus": data.corpus,
            "model_hash": loaded.content_hash}})
        del train
        save_sae(sae, folder / h)
        saes[h] = load_sae(folder / h)
        shutil.rmtree(folder / f".checkpoint-{h}", ignore_errors=True)
    atomic_write_json(folder / "index.json", {"model": loaded.name, "model_hash": loaded.content_hash,
                                              "hooks": sorted(h for h in saes if (folder / h / "cfg.json").is_file()), "config": dataclasses.asdict(cfg),
                                              "plan": plan.to_dict()})
    return {h: saes[h] for h in hooks}
