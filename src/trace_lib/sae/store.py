"""SAEs for a model, trained once and cached: keyed by model hash, hook and training config.

``get_or_train_saes(loaded, hooks)`` returns ``{hook_name: SAE}``. Missing SAEs are trained on the
reference's activations (collected for all missing hooks in one pass, see ``capture.buffer``) over a mix
of English text and chat-formatted prompts (the train splits of the built-in datasets), checkpointed so an
interrupted run resumes, evaluated with SAELens's metrics on held-out tokens, and saved in SAELens format
under ``$TRACE_CACHE/saes/<model hash>/<key>/<hook>/`` with the metrics in ``cfg.json``'s ``trace`` entry.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trace_lib.cache import atomic_write_json, cache_dir, stable_hash
from trace_lib.capture.buffer import collect_activations, mixed_training_batches, token_key
from trace_lib.capture.inputs import chunk_batches, pack_texts
from trace_lib.sae.io import load_sae, save_sae
from trace_lib.sae.model import SAE
from trace_lib.sae.quality import evaluate_sae
from trace_lib.sae.splice import ce_loss_with_sae
from trace_lib.sae.training import SAETrainingConfig, train_sae

TRAINING_DATASETS = ("harmful_refusal_v1", "uncertainty_v1", "safety_warning_v1", "capability_v1")


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


def default_hooks(loaded) -> list[str]:
    """The residual stream after the blocks at 1/3, 1/2 and 2/3 of the depth (layers 10, 15, 20 of 30):
    where refusal and other behaviour directions are readable (Arditi et al. 2024 find them mid-network)."""
    n = loaded.n_layers
    layers = sorted({round(n / 3), round(n / 2), round(2 * n / 3)})
    return [f"blocks.{min(i, n - 1)}.hook_resid_post" for i in layers]


def default_training_config() -> SAETrainingConfig:
    """ReLU SAE, 4x expansion, L1 coefficient steered to mean L0 58, decoder refit after training.

    A ReLU code ``max(0, W_enc x + b_enc)`` is continuous in the residual stream, so a tiny perturbation
    (FP16 rounding) makes a tiny change in every latent; a TopK or JumpReLU code jumps where a latent crosses
    the k-th value or its threshold, which puts a floor under CPFR that is not the variant's doing
    (docs/metrics.md, "the CPFR noise floor"). The L0 target replaces TopK's k as the sparsity knob, and the
    least-squares decoder refit pays back the L1 penalty's shrinkage. On the default model this meets the
    quality bar at the default hooks within the time budget (figures in docs/sae.md)."""
    return SAETrainingConfig(architecture="relu", expansion_factor=4, batch_size=1024, lr=2e-3, epochs=6,
                             l1_coefficient=0.8, target_l0=58, refit_decoder=True)


@dataclass
class SAEDataPlan:
    """What an SAE is trained on: packed English text plus the train splits of the built-in prompt sets."""

    text_sequences: int = 512
    seq_len: int = 128
    datasets: tuple[str, ...] = TRAINING_DATASETS
    eval_tokens: int = 8192
    ce_eval_sequences: int = 8
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _training_batches(loaded, plan: SAEDataPlan):
    from trace_lib.datasets import get_dataset
    from trace_lib.datasets.corpus import english_corpus

    prompts = []
    for name in plan.datasets:
        prompts += [p.text for p in get_dataset(name).split("train").prompts]
    texts = english_corpus(include_system_texts=False, seed=plan.seed)
    batches = mixed_training_batches(loaded, texts, prompts, seq_len=plan.seq_len,
                                     max_text_sequences=plan.text_sequences)
    # CE-loss evaluation text: chunks after the training ones, never trained on.
    ids = pack_texts(loaded.tokenizer, texts, plan.seq_len, max_sequences=plan.text_sequences + plan.ce_eval_sequences)
    ce_batches = list(chunk_batches(ids[plan.text_sequences:], 4))
    return batches, ce_batches


def sae_folder(loaded, cfg: SAETrainingConfig, plan: SAEDataPlan) -> Path:
    key = stable_hash({"cfg": dataclasses.asdict(cfg), "plan": plan.to_dict()})
    return cache_dir("saes", loaded.content_hash, key)


def get_or_train_saes(loaded, hooks: Sequence[str] | None = None, cfg: SAETrainingConfig | None = None,
                      plan: SAEDataPlan | None = None, progress: bool = True) -> dict[str, SAE]:
    """Cached SAEs for ``hooks`` (default :func:`default_hooks`), training the missing ones."""
    hooks = [loaded.arch.resolve(h) for h in (hooks or default_hooks(loaded))]
    cfg = cfg or default_training_config()
    plan = plan or SAEDataPlan()
    folder = sae_folder(loaded, cfg, plan)
    saes: dict[str, SAE] = {}
    missing = []
    for h in hooks:
        if (folder / h / "cfg.json").is_file():
            saes[h] = load_sae(folder / h)
        else:
            missing.append(h)
    if not missing:
        return saes
    batches, ce_batches = _training_batches(loaded, plan)
    acts = collect_activations(loaded, missing, batches, description="collecting SAE training activations")
    for h in missing:
        x, n_massive = drop_massive_activations(acts.pop(h))
        g = torch.Generator().manual_seed(plan.seed)
        perm = torch.randperm(len(x), generator=g)
        held_out, train = x[perm[: plan.eval_tokens]], x[perm[plan.eval_tokens:]]
        del x
        t0 = time.perf_counter()
        sae, log = train_sae(train, cfg, hook_name=h, checkpoint_dir=folder / f".checkpoint-{h}", progress=progress,
                             model_name=loaded.name)
        seconds = time.perf_counter() - t0
        quality = {k: v for k, v in evaluate_sae(sae, [held_out]).items() if k != "feature_frequencies"}
        quality.update(ce_loss_with_sae(loaded, sae, h, ce_batches))
        sae.cfg.metadata.update({"quality": quality, "training": {
            "tokens": int(len(train)), "held_out_tokens": int(len(held_out)), "seconds": round(seconds, 1),
            "massive_activation_tokens_dropped": n_massive, "massive_activation_rule": MASSIVE_RULE,
            "steps": log.get("steps"), "tokens_per_s": log.get("tokens_per_s"), "config": dataclasses.asdict(cfg),
            "data": plan.to_dict(), "data_tokens_key": token_key(batches), "model_hash": loaded.content_hash}})
        save_sae(sae, folder / h)
        saes[h] = load_sae(folder / h)
        import shutil

        shutil.rmtree(folder / f".checkpoint-{h}", ignore_errors=True)
    atomic_write_json(folder / "index.json", {"model": loaded.name, "model_hash": loaded.content_hash,
                                              "hooks": sorted(saes), "config": dataclasses.asdict(cfg),
                                              "plan": plan.to_dict()})
    return {h: saes[h] for h in hooks}
