"""Per-feature reductions shared by the feature metrics: column blocks that bound memory for wide SAEs, NaN-skipping
means, ids of selected columns."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

#: per-feature statistics are computed on column blocks of at most this many elements (float64: 128 MiB).
_BLOCK_ELEMENTS = 1 << 24
_NAN = float("nan")


def _column_blocks(n_rows: int, n_cols: int) -> Iterator[slice]:
    step = max(1, _BLOCK_ELEMENTS // max(n_rows, 1))
    for start in range(0, n_cols, step):
        yield slice(start, min(start + step, n_cols))


def _nanmean(values: torch.Tensor) -> float:
    finite = values[~torch.isnan(values)]
    return float(finite.mean().item()) if finite.numel() else _NAN


def _ids_where(mask: torch.Tensor, ids: Sequence[int]) -> list[int]:
    return [ids[i] for i in torch.nonzero(mask).flatten().tolist()]
