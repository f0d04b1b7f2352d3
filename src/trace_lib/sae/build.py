"""``trace sae build``: train a model's SAEs once on the broad corpus and write them as a shipped pack.

The pack's quality is measured on what is written, not on what was trained: the float16 SAEs are read back
(cast to float32, as every load does) and scored on the held-out split of the broad corpus, which no training
chunk shares a document with: explained variance and L0 (SAELens's definitions, :mod:`trace_lib.sae.quality`)
and CE-loss recovered (:mod:`trace_lib.sae.splice`). Massive-activation tokens are left out of EV and L0 as in
training (:func:`trace_lib.sae.store.drop_massive_activations`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from trace_lib.cache import atomic_write_json
from trace_lib.capture.buffer import collect_activations
from trace_lib.errors import SAEError
from trace_lib.sae.plan import SAEDataPlan, plan_batches
from trace_lib.sae.quality import evaluate_sae
from trace_lib.sae.shipped import MANIFEST, SAEPack, read_pack, write_pack
from trace_lib.sae.splice import ce_loss_with_sae
from trace_lib.sae.store import (
    default_hooks,
    default_training_config,
    drop_massive_activations,
    get_or_train_saes,
)
from trace_lib.sae.training import SAETrainingConfig

QUALITY_KEYS = ("explained_variance", "l0", "mse", "dead_fraction", "dense_fraction", "tokens")


def build_sae_pack(loaded, out: str | Path, hooks: Sequence[str] | None = None,
                   cfg: SAETrainingConfig | None = None, plan: SAEDataPlan | None = None, build_command: str = "",
                   log: Callable[[str], None] = lambda s: None) -> SAEPack:
    """Train (or take from the cache) ``loaded``'s SAEs at ``hooks`` and write them to ``out`` as a pack."""
    hooks = [loaded.arch.resolve(h) for h in (hooks or default_hooks(loaded))]
    cfg = cfg or default_training_config()
    plan = plan or SAEDataPlan()
    if plan.corpus != "broad":
        raise SAEError("a shipped SAE pack is measured on the broad corpus's held-out split: use corpus='broad'")
    t0 = time.perf_counter()
    saes = get_or_train_saes(loaded, hooks, cfg=cfg, plan=plan, shipped=False)
    train_s = time.perf_counter() - t0
    log(f"trained or loaded {len(saes)} SAEs in {train_s:.0f} s; writing the pack to {out}")
    # the weights' own hash: the pack serves the model whatever device and dtype a later run places it in
    pack = write_pack(saes, out, model=loaded.name, model_hash=loaded.weights_hash or loaded.content_hash,
                      build_command=build_command)
    shipped = pack.load(hooks)
    data = plan_batches(loaded, plan)
    held = collect_activations(loaded, hooks, data.heldout, description="collecting held-out activations")
    quality: dict[str, dict[str, Any]] = {}
    for h in hooks:
        x, dropped = drop_massive_activations(held.pop(h))
        q = evaluate_sae(shipped[h], [x])
        record = {k: q[k] for k in QUALITY_KEYS}
        record["massive_activation_tokens_dropped"] = dropped
        record.update(ce_loss_with_sae(loaded, shipped[h], h, data.ce))
        record["training_l0"] = saes[h].cfg.metadata.get("quality", {}).get("l0")
        quality[h] = record
        log(f"{h}: held-out EV {record['explained_variance']:.3f}, L0 {record['l0']:.1f}, "
            f"CE recovered {record['ce_loss_recovered']:.3f}")
    training = {h: {k: saes[h].cfg.metadata.get("training", {}).get(k) for k in ("tokens", "seconds", "steps")}
                for h in hooks}
    extra = {"config": dataclasses.asdict(cfg), "plan": plan.to_dict(), "corpus": data.corpus,
             "quality": quality, "quality_measured_on": "broad corpus heldout split, float16 weights as shipped",
             "training": training, "activations_from": {"device": str(loaded.device),
                                                          "dtype": str(loaded.dtype).replace("torch.", "")}}
    atomic_write_json(Path(out) / MANIFEST, {**pack.manifest, **extra})
    return read_pack(out)
