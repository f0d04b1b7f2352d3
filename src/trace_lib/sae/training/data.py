"""The activation data pipeline: validated chunks in, seeded and replayable batches out.

The activations come as one tensor ``[N, d_in]`` (or ``[..., d_in]``), a sequence of such tensors, a one-shot
iterable of them, or a zero-argument callable returning a fresh iterable. A tensor is shuffled by one
``randperm`` per epoch; a stream goes through a mixing buffer of ``shuffle_buffer_tokens`` rows, of which a
shuffled half is emitted each time it fills. The permutations come from a ``torch.Generator`` seeded with
``seed + 1_000_003``, so the batch order is fixed by the config, and resuming at step ``s`` replays the
pipeline (same RNG draws) without materialising the first ``s`` batches.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import chain, count

import torch

from trace_lib.errors import SAEError
from trace_lib.sae.quality import Activations, validated_chunks
from trace_lib.sae.training.config import SAETrainingConfig


class ActivationData:
    """The activations, the first rows (for initialisation) and a replayable, seeded batch iterator.

    ``d_in``: the width; ``sample_source``: the first ``init_tokens`` rows (the whole tensor for a tensor);
    ``fingerprint``: a short hash of the first rows and the kind of source, which a checkpoint must match;
    ``n_rows``: the row count where known without reading the data (a tensor or a sequence), else None.
    """

    def __init__(self, activations: Activations, cfg: SAETrainingConfig) -> None:
        self.cfg = cfg
        self.tensor: torch.Tensor | None = None
        self.n_rows: int | None = None
        self._factory: Callable[[], Iterable[torch.Tensor]] | None = None
        self._cache: list[torch.Tensor] | None = None
        self._first_iter: Iterator[torch.Tensor] | None = None
        if isinstance(activations, torch.Tensor):
            if activations.ndim < 2:
                raise SAEError(f"activations have shape {list(activations.shape)}: expected [N, d_in]")
            for _ in validated_chunks(activations):  # NaN/Inf/shape checks, chunk by chunk
                pass
            flat = activations.reshape(-1, activations.shape[-1]).to(torch.float32)
            if flat.shape[0] == 0:
                raise SAEError("no activations to train on: the tensor has 0 rows")
            self.tensor = flat
            self.n_rows = flat.shape[0]
            self.d_in = flat.shape[1]
            self.sample_source = flat
            self.fingerprint = data_fingerprint(flat[:8], f"tensor:{flat.shape[0]}")
            return
        if callable(activations):
            self._factory = activations
            first: Iterable[torch.Tensor] = activations()
        elif isinstance(activations, Sequence):
            seq = list(activations)
            self._factory = lambda: seq
            first = seq
            try:
                self.n_rows = sum(int(math.prod(c.shape[:-1])) for c in seq)
            except (AttributeError, TypeError):
                self.n_rows = None  # validated_chunks will name the bad chunk
        else:
            first = activations
        it = validated_chunks(first)
        peeked: list[torch.Tensor] = []
        rows = 0
        for chunk in it:
            peeked.append(chunk)
            rows += chunk.shape[0]
            if rows >= cfg.init_tokens:
                break
        if rows == 0:
            raise SAEError("no activations to train on: the stream yielded no rows")
        self.d_in = peeked[0].shape[1]
        self.sample_source = torch.cat(peeked)[: cfg.init_tokens]
        kind = "callable" if callable(activations) else "sequence" if self.n_rows is not None else "iterable"
        self.fingerprint = data_fingerprint(peeked[0][:8], f"{kind}:{self.n_rows}")
        self._first_iter = chain(peeked, _checked(it, self.d_in))
        if self._factory is None and (cfg.epochs > 1 or cfg.refit_decoder):
            self._cache = []  # one-shot iterable read several times: keep it in memory

    def replayable(self) -> bool:
        """Whether the data can be read again (a tensor, a sequence or a callable)."""
        return self.tensor is not None or self._factory is not None

    def _epoch_chunks(self, epoch: int) -> Iterator[torch.Tensor]:
        if epoch == 0 and self._first_iter is not None:
            it, self._first_iter = self._first_iter, None
            for chunk in it:
                if self._cache is not None:
                    self._cache.append(chunk)
                yield chunk
        elif self._factory is not None:
            yield from validated_chunks(self._factory(), self.d_in)
        elif self._cache is not None:
            yield from self._cache

    def batches(self, n_epochs: int | None, skip: int = 0) -> Iterator[torch.Tensor]:
        """CPU batches of ``batch_size`` rows (the last may be shorter); ``n_epochs=None``: cycle forever.

        The first ``skip`` batches are drawn (same RNG use, same order) but not materialised, for resuming;
        SAEError if the data end before them.
        """
        bs = self.cfg.batch_size
        gen = torch.Generator().manual_seed(self.cfg.seed + 1_000_003)
        epochs: Iterable[int] = range(n_epochs) if n_epochs is not None else count()
        index = 0
        if self.tensor is not None:
            x = self.tensor
            for _ in epochs:
                perm = torch.randperm(x.shape[0], generator=gen)
                for i in range(0, x.shape[0], bs):
                    if index >= skip:
                        yield x[perm[i : i + bs]]
                    index += 1
        else:
            cap = max(self.cfg.shuffle_buffer_tokens, 2 * bs)
            pending: list[torch.Tensor] = []
            n_pending = 0
            for epoch in epochs:
                if epoch > 0 and self._factory is None and self._cache is None:
                    break  # one-shot iterable: a single pass
                got = False
                for chunk in self._epoch_chunks(epoch):
                    got = True
                    pending.append(chunk)
                    n_pending += chunk.shape[0]
                    if n_pending >= cap:
                        buf = torch.cat(pending)
                        buf = buf[torch.randperm(buf.shape[0], generator=gen)]
                        n_out = (buf.shape[0] // 2) // bs * bs
                        for i in range(0, n_out, bs):
                            if index >= skip:
                                yield buf[i : i + bs]
                            index += 1
                        pending, n_pending = [buf[n_out:]], buf.shape[0] - n_out
                if not got:
                    break
            if n_pending:
                buf = torch.cat(pending)
                buf = buf[torch.randperm(buf.shape[0], generator=gen)]
                for i in range(0, buf.shape[0], bs):
                    if index >= skip:
                        yield buf[i : i + bs]
                    index += 1
        if index < skip:
            raise SAEError(
                f"the activations hold only {index} batches but the checkpoint is at step {skip}: "
                "resume with the same activations and config"
            )


def _checked(it: Iterator[torch.Tensor], d_in: int) -> Iterator[torch.Tensor]:
    for chunk in it:
        if chunk.shape[1] != d_in:
            raise SAEError(
                f"an activation chunk has width {chunk.shape[1]} but earlier chunks have {d_in}: all chunks must "
                "come from the same hook of the same model"
            )
        yield chunk


def data_fingerprint(rows: torch.Tensor, kind: str) -> str:
    """16 hex digits of sha256(kind, bytes of rows): what identifies the activations in a checkpoint."""
    h = hashlib.sha256(kind.encode())
    h.update(rows.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
