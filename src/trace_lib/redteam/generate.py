"""Greedy replies to chat prompts, batched with left padding, stopped at end of turn, cached on disk.

Each prompt is formatted with the tokenizer's chat template (user turn + generation prompt, as
:func:`trace_lib.capture.inputs.format_prompts`), then ``model.generate(do_sample=False)`` runs on batches of
left-padded prompts (generation appends at the right, so padding goes left; Hugging Face derives each row's
positions from its attention mask, so a padded row sees the same positions as unpadded). Generation stops at
the end-of-turn token(s) or after ``max_new_tokens``; only the new tokens are decoded, special tokens skipped.

Prompts are sorted by length before batching (less padding) and the replies returned in the input order.
A prompt whose formatted length plus ``max_new_tokens`` exceeds the model's context is truncated: its user
message is cut (the template's tokens around it are kept) with a warning, and the run records it.

Replies are cached in ``$TRACE_CACHE/generations/<key>.json``, key = model content hash + the formatted
prompts + the settings; the file is rewritten atomically after every batch, so an interrupted run keeps the
finished batches and a re-run is instant.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from trace_lib.cache import atomic_write_json, cache_dir, stable_hash
from trace_lib.capture.inputs import encode_prompts
from trace_lib.errors import DatasetError, TraceError
from trace_lib.models.device import model_device, to_device
from trace_lib.progress import track

CACHE_VERSION = 1
#: Tokens that end an assistant turn in common chat templates (those present in the vocabulary are used).
END_OF_TURN_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "</s>")


@dataclass
class GenerationRun:
    """Replies in prompt order, with what was done to get them."""

    replies: list[str]
    n_new_tokens: list[int]
    truncated: dict[int, str] = field(default_factory=dict)  # prompt index -> why
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0
    cached: int = 0  # replies read from the cache


def end_of_turn_ids(tokenizer, model=None) -> list[int]:
    """Token ids that end a turn: the tokenizer's EOS, known end-of-turn tokens, the model's generation EOS."""
    ids: list[int] = []

    def add(x):
        if x is None:
            return
        for i in (x if isinstance(x, (list, tuple)) else [x]):
            if isinstance(i, int) and i >= 0 and i not in ids:
                ids.append(i)

    add(getattr(tokenizer, "eos_token_id", None))
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    for tok in END_OF_TURN_TOKENS:
        if tok in vocab:
            add(vocab[tok])
    gc = getattr(model, "generation_config", None)
    if gc is not None:
        add(getattr(gc, "eos_token_id", None))
    return ids


def model_context(model) -> int | None:
    """The model's maximum sequence length (``max_position_embeddings`` / ``n_positions``), if it states one."""
    cfg = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None






def generation_key(loaded, ids: Sequence[Sequence[int]], settings: dict) -> str:
    return stable_hash({"v": CACHE_VERSION, "model": loaded.content_hash, "ids": stable_hash([list(x) for x in ids]),
                        **settings}, n=24)


def _load_cache(path) -> dict:
    import json

    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        return d if d.get("version") == CACHE_VERSION else {}
    except (OSError, ValueError):
        return {}


def generate(loaded, prompts: Sequence[str], max_new_tokens: int = 64, batch_size: int = 8, chat: bool = True,
             cache: bool = True, description: str = "generating") -> GenerationRun:
    """Greedy replies to ``prompts`` (see the module docstring); also returns lengths, truncations, timing."""
    if loaded.tokenizer is None:
        raise TraceError(f"{loaded.name} has no tokenizer, so it cannot generate replies")
    if not prompts:
        raise DatasetError("no prompts to generate replies for")
    if max_new_tokens < 1:
        raise TraceError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if batch_size < 1:
        raise TraceError(f"batch_size must be at least 1, got {batch_size}")
    tok, model = loaded.tokenizer, loaded.model
    ctx = model_context(model)
    limit = (ctx - max_new_tokens) if ctx else 1 << 30
    if limit < 1:
        raise TraceError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's context of "
                         f"{ctx} tokens")
    ids, truncated = encode_prompts(tok, list(prompts), limit, chat,
                                    why=f"to leave room for {max_new_tokens} new tokens in the model's context")
    eos = end_of_turn_ids(tok, model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (eos[0] if eos else 0)
    settings = {"max_new_tokens": int(max_new_tokens), "batch_size": int(batch_size), "greedy": True,
                "eos": eos, "chat": bool(chat)}
    key = generation_key(loaded, ids, settings)
    path = cache_dir("generations") / f"{key}.json"
    store = _load_cache(path) if cache else {}
    done: dict[str, dict] = dict(store.get("replies", {}))
    n_cached = sum(str(i) in done for i in range(len(ids)))
    order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    todo = [b for b in batches if not all(str(i) in done for i in b)]
    t0 = time.perf_counter()
    device = model_device(model)
    from transformers import GenerationConfig

    gc = GenerationConfig(do_sample=False, max_new_tokens=int(max_new_tokens), pad_token_id=pad,
                          eos_token_id=eos or None, bos_token_id=getattr(tok, "bos_token_id", None))
    for batch in track(todo, f"{description} ({loaded.name})"):
        rows = [ids[i] for i in batch]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):  # left padding
            input_ids[j, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[j, width - len(r):] = 1
        with torch.no_grad():
            out = model.generate(**to_device({"input_ids": input_ids, "attention_mask": mask}, device),
                                 generation_config=gc)
        new = out[:, width:].cpu()
        for j, i in enumerate(batch):
            seq = new[j].tolist()
            n = len(seq)
            for k, t in enumerate(seq):  # up to and including the first end-of-turn token
                if t in eos:
                    n = k + 1
                    break
            done[str(i)] = {"text": tok.decode(seq[:n], skip_special_tokens=True), "n_new_tokens": n}
        if cache:
            atomic_write_json(path, {"version": CACHE_VERSION, "model": loaded.content_hash, "settings": settings,
                                     "n_prompts": len(ids), "replies": done})
    replies = [done[str(i)]["text"] for i in range(len(ids))]
    return GenerationRun(replies, [int(done[str(i)]["n_new_tokens"]) for i in range(len(ids))], truncated,
                         {**settings, "context": ctx, "cache_key": key}, time.perf_counter() - t0, n_cached)


def generate_replies(loaded, prompts: Sequence[str], max_new_tokens: int = 64, batch_size: int = 8,
                     chat: bool = True, cache: bool = True) -> list[str]:
    """Greedy replies to ``prompts`` in order (see :func:`generate` and the module docstring)."""
    return generate(loaded, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, chat=chat,
                    cache=cache).replies
