"""Collecting activations at several hook points in one pass, with an atomic on-disk cache.

SAE training is bound by the forward passes that produce its data, so every hook point needed is
captured in the same pass, the pass stops after the deepest one, and the result is cached under
``$TRACE_CACHE/activations/`` keyed by model hash, hooks and input tokens: an interrupted run resumes
from the shards already written and never re-reads a half-written file.

Position 0 of every sequence is left out by default: its residual stream is an attention sink whose
norm is tens of times the others', which would dominate an SAE's loss and every metric (SAELens and most
SAE trainers exclude it likewise).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from trace_lib.cache import atomic_write, atomic_write_json, cache_dir, stable_hash
from trace_lib.capture.hooks import HookConfig, iter_activations
from trace_lib.errors import HookError
from trace_lib.progress import track


def token_key(batches: Sequence[dict[str, torch.Tensor]]) -> str:
    """A hash of the token ids and masks of a list of batches."""
    import hashlib

    h = hashlib.sha256()
    for b in batches:
        h.update(b["input_ids"].numpy().tobytes())
        h.update(b["attention_mask"].numpy().tobytes())
    return h.hexdigest()[:16]


def _valid_mask(batch: dict[str, torch.Tensor], skip_first: bool) -> torch.Tensor:
    mask = batch["attention_mask"].bool().clone()
    if skip_first:
        mask[:, 0] = False
    return mask


def collect_activations(loaded, hook_names: Sequence[str], batches: Sequence[dict[str, torch.Tensor]],
                        skip_first: bool = True, cache: bool = True, shard_batches: int = 16,
                        description: str = "collecting activations") -> dict[str, torch.Tensor]:
    """Activations of real tokens at ``hook_names``: ``{name: [n_tokens, d]}`` float32.

    With ``cache=True`` the activations are written in shards of ``shard_batches`` batches to
    ``$TRACE_CACHE/activations/<key>/``; a later call with the same model, hooks and tokens reads them
    back, and an interrupted call resumes after the last complete shard.
    """
    names = [loaded.arch.resolve(n) for n in hook_names]
    batches = list(batches)
    if not batches:
        raise HookError("no input batches to collect activations from")
    folder = None
    if cache:
        key = stable_hash({"model": loaded.content_hash, "hooks": names, "tokens": token_key(batches),
                           "skip_first": skip_first})
        folder = cache_dir("activations", key)
    shards = [batches[i: i + shard_batches] for i in range(0, len(batches), shard_batches)]
    parts: dict[int, dict[str, torch.Tensor]] = {}
    todo = []
    for si, shard in enumerate(shards):
        f = folder / f"shard-{si:05d}.safetensors" if folder else None
        if f is not None and f.is_file():
            parts[si] = load_file(f)
        else:
            todo.append((si, shard))
    if todo:
        total = sum(len(s) for _, s in todo)
        stream = iter_activations(loaded, (b for _, s in todo for b in s), HookConfig(layers=[], hook_points=(),
                                                                                      names=tuple(names)))
        stream = iter(track(stream, description, total=total))
        for si, shard in todo:
            part: dict[str, list[torch.Tensor]] = {n: [] for n in names}
            for b in shard:
                cb = next(stream)
                mask = _valid_mask(b, skip_first)
                for n in names:
                    part[n].append(cb.acts[n][mask])
            merged = {n: torch.cat(part[n]).contiguous() for n in names}
            if folder is not None:
                atomic_write(folder / f"shard-{si:05d}.safetensors", lambda p, m=merged: save_file(m, str(p)))
            parts[si] = merged
        if folder is not None:
            atomic_write_json(folder / "meta.json", {"model": loaded.content_hash, "hooks": names,
                                                     "batches": len(batches), "shards": len(shards)})
    # Shards are joined in index order, so a resumed run returns exactly what an uninterrupted one does; each
    # hook's shards are released as it is joined, so the peak is the activations plus one hook's copy.
    return {n: torch.cat([parts[si].pop(n) for si in range(len(shards))]) for n in names}


def cached_activation_folders() -> list[Path]:
    root = cache_dir("activations")
    return sorted(p for p in root.iterdir() if (p / "meta.json").is_file())


def describe_cache(folder: Path) -> dict:
    return json.loads((folder / "meta.json").read_text())


def mixed_training_batches(loaded, texts: Iterable[str], prompts: Sequence[str], seq_len: int = 128,
                           max_text_sequences: int = 512, batch_size: int = 16) -> list[dict[str, torch.Tensor]]:
    """Training data for SAEs: packed English text plus chat-formatted prompts (so the template's positions,
    where refusal is decided, are in the SAE's training distribution)."""
    from trace_lib.capture.inputs import chunk_batches, pack_texts, prompt_batches

    ids = pack_texts(loaded.tokenizer, list(texts), seq_len, max_sequences=max_text_sequences)
    out = list(chunk_batches(ids, batch_size))
    if prompts:
        out.extend(prompt_batches(loaded.tokenizer, list(prompts), batch_size=batch_size * 2))
    return out
