"""How good an SAE is on a set of activations: the standard SAELens metrics.

Definitions follow SAELens ``sae_lens/evals.py`` (``get_sparsity_and_variance_metrics``,
``ExplainedVarianceCalculator``, ``get_downstream_reconstruction_metrics``):

* **explained variance** = ``1 - E_t ||x_t - x̂_t||² / (E_t ||x_t||² - ||E_t x_t||²)``: one minus the summed
  squared residual over the *total* variance of x (summed over dimensions, around the mean over all
  tokens). This is SAELens's current ``explained_variance``; its older per-token average
  ``mean_t(1 - ||x_t - x̂_t||² / ||x_t - mean(x)||²)`` is kept there as ``explained_variance_legacy`` and is
  *not* what trace reports.
* **MSE** = ``E_t ||x_t - x̂_t||²`` (sum over dimensions, mean over tokens: SAELens's ``mse`` and training
  loss convention).
* **L0** = mean over tokens of the number of latents with a non-zero code (SAELens counts ``!= 0``).
* **feature frequency** (SAELens ``feature_density``) = fraction of tokens on which a latent is non-zero.
* **dead fraction** = fraction of latents that never fire on the evaluated tokens (frequency exactly 0).
* **dense fraction** = fraction of latents firing on more than ``dense_threshold`` of tokens, default 0.1
  (``log10(frequency) > -1``). SAELens's ``evals.py`` has no dense-latent count (it reports the raw
  densities; its trainer logs latents *below* 1e-5 and 1e-6); the 10% cut-off is trace's choice, a common
  reading of SAELens's log-density histograms, and is a parameter.
* **CE loss recovered** (SAELens ``ce_loss_score``) = ``(L_zero - L_sae) / (L_zero - L_clean)``, where the
  three are the LM's next-token cross-entropy with the hook output zero-ablated, replaced by the SAE
  reconstruction, and untouched.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from trace_lib.errors import SAEError

Activations = torch.Tensor | Iterable[torch.Tensor] | Callable[[], Iterable[torch.Tensor]]


# ---------------------------------------------------------------------------------------------- input checks
def validated_chunks(
    activations: Activations, d_in: int | None = None, chunk_rows: int = 65536
) -> Iterator[torch.Tensor]:
    """Yield float32 [n, d_in] chunks from a tensor, an iterable of tensors, or a callable returning one.

    Leading dimensions are flattened ([batch, seq, d] is fine). Raises SAEError naming the chunk for
    NaN/Inf values, a wrong width or a non-tensor item. Empty chunks are skipped. A single tensor is cut
    into views of ``chunk_rows`` rows (its chunk index in messages is then the slice index).
    """
    if callable(activations) and not isinstance(activations, torch.Tensor):
        activations = activations()
    if isinstance(activations, torch.Tensor):
        flat = _flatten(activations, 0, d_in)
        source: Iterable[Any] = (flat[i : i + chunk_rows] for i in range(0, flat.shape[0], chunk_rows))
    else:
        source = activations
    try:
        it = iter(source)
    except TypeError as e:
        raise SAEError(
            f"activations must be a tensor or an iterable of [N, d_in] tensors, got {type(activations).__name__}"
        ) from e
    for index, chunk in enumerate(it):
        chunk = _flatten(chunk, index, d_in)
        if chunk.shape[0] == 0:
            continue
        if d_in is None:
            d_in = chunk.shape[1]
        if not bool(torch.isfinite(chunk).all()):
            bad = (~torch.isfinite(chunk)).any(dim=1).nonzero()[0, 0].item()
            kind = "NaN" if bool(torch.isnan(chunk).any()) else "Inf"
            raise SAEError(
                f"activation chunk {index} contains {kind} (first bad row {bad}): the model overflowed or the "
                "capture is corrupt; recapture the activations (e.g. in float32) before training or evaluating"
            )
        yield chunk


def _flatten(chunk: Any, index: int, d_in: int | None) -> torch.Tensor:
    if not isinstance(chunk, torch.Tensor):
        try:
            chunk = torch.as_tensor(chunk)
        except Exception as e:  # noqa: BLE001 - anything not tensor-like
            raise SAEError(
                f"activation chunk {index} is a {type(chunk).__name__}, not a tensor: yield [N, d_in] tensors"
            ) from e
    if chunk.ndim < 2:
        raise SAEError(
            f"activation chunk {index} has shape {list(chunk.shape)}: expected [N, d_in] (or [..., d_in])"
        )
    if d_in is not None and chunk.shape[-1] != d_in:
        raise SAEError(
            f"activation chunk {index} has width {chunk.shape[-1]} but d_in is {d_in}: all chunks must come "
            "from the same hook of the same model"
        )
    if not chunk.is_floating_point():
        raise SAEError(f"activation chunk {index} has dtype {chunk.dtype}: expected floating-point activations")
    return chunk.reshape(-1, chunk.shape[-1]).to(torch.float32)


# ---------------------------------------------------------------------------------------------- metrics
def explained_variance(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """``1 - sum_t ||x_t - x̂_t||² / sum_t ||x_t - mean_t(x)||²`` over all tokens (total variance).

    This is SAELens's current ``explained_variance`` (``ExplainedVarianceCalculator``), not the per-token
    ``explained_variance_legacy``. Inputs are [..., d] and flattened to tokens; sums are in float64. If x has
    (numerically) zero variance, returns 1.0 for a perfect reconstruction and 0.0 otherwise, as SAELens.
    """
    if x.shape != x_hat.shape:
        raise SAEError(f"explained_variance needs x and x_hat of the same shape, got {list(x.shape)} and {list(x_hat.shape)}")
    acc = _EVAccumulator()
    acc.add(x.reshape(-1, x.shape[-1]), x_hat.reshape(-1, x.shape[-1]))
    return acc.value()


def mean_l0(codes: torch.Tensor) -> float:
    """Mean over tokens of the number of non-zero latents (codes [..., d_sae])."""
    flat = codes.reshape(-1, codes.shape[-1])
    if flat.shape[0] == 0:
        return float("nan")
    return (flat != 0).sum(dim=-1).double().mean().item()


def feature_frequencies(codes: torch.Tensor) -> torch.Tensor:
    """Per-latent fraction of tokens with a non-zero code ([d_sae], float64); SAELens's ``feature_density``."""
    flat = codes.reshape(-1, codes.shape[-1])
    if flat.shape[0] == 0:
        return torch.full((flat.shape[-1],), float("nan"), dtype=torch.float64)
    return (flat != 0).sum(dim=0).double().cpu() / flat.shape[0]


def dead_fraction(frequencies: torch.Tensor) -> float:
    """Fraction of latents that never fired (frequency exactly 0)."""
    return (frequencies == 0).double().mean().item()


def dense_fraction(frequencies: torch.Tensor, threshold: float = 0.1) -> float:
    """Fraction of latents firing on more than ``threshold`` of tokens (default 10%, log10 frequency > -1)."""
    return (frequencies > threshold).double().mean().item()


def ce_loss_recovered(clean_loss: float, sae_loss: float, zero_ablation_loss: float) -> float:
    """SAELens's ``ce_loss_score``: ``(zero_ablation_loss - sae_loss) / (zero_ablation_loss - clean_loss)``.

    1.0 means splicing in the SAE costs nothing, 0.0 means it is as bad as zeroing the hook. Values can leave
    [0, 1] (an SAE worse than zero-ablation is negative). Returns NaN when zero-ablation does not change the
    loss (the ratio is undefined).
    """
    denom = float(zero_ablation_loss) - float(clean_loss)
    if denom == 0 or not math.isfinite(denom):
        return float("nan")
    return (float(zero_ablation_loss) - float(sae_loss)) / denom


class _EVAccumulator:
    """Streaming explained variance (float64 sums on CPU), as SAELens's ``ExplainedVarianceCalculator``."""

    def __init__(self) -> None:
        self.sum_x: torch.Tensor | None = None
        self.sum_sq_norm = 0.0
        self.sum_sq_resid = 0.0
        self.n = 0

    def add(self, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        x64 = x.detach().to(torch.float64)
        r = (x64 - x_hat.detach().to(torch.float64)).pow(2).sum().item()
        s = x64.sum(dim=0).cpu()
        self.sum_x = s if self.sum_x is None else self.sum_x + s
        self.sum_sq_norm += x64.pow(2).sum().item()
        self.sum_sq_resid += r
        self.n += x.shape[0]

    def mse(self) -> float:
        return self.sum_sq_resid / self.n if self.n else float("nan")

    def value(self) -> float:
        if self.n == 0 or self.sum_x is None:
            return float("nan")
        mean = self.sum_x / self.n
        total_var = self.sum_sq_norm / self.n - mean.pow(2).sum().item()
        mse = self.sum_sq_resid / self.n
        if total_var < 1e-10:
            return 1.0 if mse < 1e-10 else 0.0
        return 1.0 - mse / total_var


@torch.no_grad()
def evaluate_sae(
    sae: Any,
    activations: Activations,
    *,
    batch_size: int = 8192,
    dense_threshold: float = 0.1,
) -> dict[str, Any]:
    """Stream activations through ``sae`` and report reconstruction and sparsity metrics.

    Only per-latent counters and a handful of sums are kept, never all tokens. Returns ``tokens``,
    ``explained_variance``, ``mse``, ``l0``, ``l1``, ``dead_fraction``, ``dense_fraction``, ``n_dead``,
    ``n_dense``, ``dense_threshold`` and ``feature_frequencies`` (a float64 [d_sae] tensor). See the module
    docstring for definitions. Raises SAEError for NaN/Inf, a width other than ``sae.cfg.d_in``, or no tokens.
    """
    ev = _EVAccumulator()
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.int64)
    l0_sum = 0.0
    l1_sum = 0.0
    n = 0
    for chunk in validated_chunks(activations, sae.cfg.d_in):
        for i in range(0, chunk.shape[0], batch_size):
            x = chunk[i : i + batch_size]
            z = sae.encode(x)
            x_hat = sae.decode(z)
            nz = z != 0
            fired += nz.sum(dim=0).cpu()
            l0_sum += nz.sum().item()
            l1_sum += z.abs().double().sum().item()
            ev.add(x.to(x_hat.device), x_hat)
            n += x.shape[0]
    if n == 0:
        raise SAEError("no activations to evaluate the SAE on: the stream was empty")
    freqs = fired.double() / n
    return {
        "tokens": n,
        "explained_variance": ev.value(),
        "mse": ev.mse(),
        "l0": l0_sum / n,
        "l1": l1_sum / n,
        "dead_fraction": dead_fraction(freqs),
        "dense_fraction": dense_fraction(freqs, dense_threshold),
        "n_dead": int((freqs == 0).sum().item()),
        "n_dense": int((freqs > dense_threshold).sum().item()),
        "dense_threshold": dense_threshold,
        "feature_frequencies": freqs,
    }
