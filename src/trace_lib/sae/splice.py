"""CE loss recovered: the SAE's reconstruction spliced into the model's forward pass (SAELens's definition).

    recovered = (L_zero - L_sae) / (L_zero - L_clean)

where L is the mean next-token cross-entropy over the evaluation tokens with the hook's activation left as it
is (clean), replaced by the SAE's reconstruction (sae), or replaced by zeros (zero ablation). 1 means the
reconstruction loses nothing the model uses; 0 means it is as bad as deleting the activation. Position 0 keeps
its value in all three runs (see ``capture.splice``) and is not scored.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from trace_lib.capture.splice import replace_activation
from trace_lib.models.device import to_device
from trace_lib.sae.quality import ce_loss_recovered


def _mean_ce(loaded, batches: list[dict[str, torch.Tensor]]) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            b = to_device(b, loaded.device)
            logits = loaded.model(**b, use_cache=False).logits[:, 1:-1].float()
            target = b["input_ids"][:, 2:]
            mask = (b["attention_mask"][:, 1:-1] * b["attention_mask"][:, 2:]).bool()
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
            total += float(ce[mask.reshape(-1)].sum())
            count += int(mask.sum())
    return total / max(count, 1)


def clean_ce_loss(loaded, batches: Iterable[dict[str, torch.Tensor]]) -> float:
    """The clean mean CE loss over ``batches`` (the same for every hook; pass it to :func:`ce_loss_with_sae`)."""
    return _mean_ce(loaded, list(batches))


def ce_loss_with_sae(loaded, sae, hook_name: str, batches: Iterable[dict[str, torch.Tensor]],
                     clean: float | None = None) -> dict[str, float]:
    """Clean, spliced and zero-ablated CE losses and the fraction of CE loss recovered; ``clean`` is the
    :func:`clean_ce_loss` of the same batches when already known (several hooks share one clean pass)."""
    batches = list(batches)
    clean = _mean_ce(loaded, batches) if clean is None else clean
    with replace_activation(loaded, hook_name, lambda x: sae(x.float())):
        spliced = _mean_ce(loaded, batches)
    with replace_activation(loaded, hook_name, torch.zeros_like):
        zero = _mean_ce(loaded, batches)
    return {"ce_loss_clean": clean, "ce_loss_sae": spliced, "ce_loss_zero": zero,
            "ce_loss_recovered": ce_loss_recovered(clean, spliced, zero)}
