"""Token batches for both models: packed text chunks and chat-formatted prompts.

Both the reference and every variant read exactly these tensors. Prompts are right-padded: Hugging Face
models number positions from 0 regardless of padding, so right padding keeps every real token at the
position it has unpadded, and causal attention keeps padding from affecting real tokens.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence

import torch

from trace_lib.errors import DatasetError, TraceError


def pack_texts(tokenizer, texts: Sequence[str], seq_len: int, max_sequences: int | None = None) -> torch.Tensor:
    """Tokenize ``texts``, join them with the EOS token and cut the stream into [n, seq_len] chunks.

    The incomplete last chunk is dropped. This is how llama.cpp's perplexity tool and SAE trainers feed
    text: every position has real context, no padding.
    """
    if seq_len < 2:
        raise DatasetError(f"sequence length must be at least 2, not {seq_len}")
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    stream: list[int] = []
    need = None if max_sequences is None else max_sequences * seq_len
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if sep is not None:
            stream.append(sep)
        if need is not None and len(stream) >= need:
            break
    n = len(stream) // seq_len
    if max_sequences is not None:
        n = min(n, max_sequences)
    if n == 0:
        raise DatasetError(f"the text gives {len(stream)} tokens, fewer than one sequence of {seq_len}; "
                           "give more text or a shorter sequence length")
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def chunk_batches(ids: torch.Tensor, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of packed chunks (no padding)."""
    for i in range(0, len(ids), batch_size):
        chunk = ids[i: i + batch_size]
        yield {"input_ids": chunk, "attention_mask": torch.ones_like(chunk)}


def format_prompts(tokenizer, prompts: Sequence[str], chat: bool = True) -> list[str]:
    """Apply the tokenizer's chat template (user turn + generation prompt) where it has one."""
    if chat and getattr(tokenizer, "chat_template", None):
        return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                              add_generation_prompt=True) for p in prompts]
    return list(prompts)


def encode_prompts(tokenizer, prompts: Sequence[str], max_prompt_tokens: int, chat: bool = True,
                   why: str = "") -> tuple[list[list[int]], dict[int, str]]:
    """Token ids of each (chat-formatted) prompt; a prompt longer than ``max_prompt_tokens`` has the end of its
    user message cut, so the template's tokens around it (the post-instruction tokens that fingerprints and
    generation read) are kept. Each cut warns; returns the ids and ``{prompt index: reason}`` for the cut ones.
    """
    chat = bool(chat and getattr(tokenizer, "chat_template", None))

    def encode(ps: Sequence[str]) -> list[list[int]]:
        return [tokenizer(t, add_special_tokens=not chat)["input_ids"] for t in format_prompts(tokenizer, ps, chat)]

    ids = encode(prompts)
    truncated: dict[int, str] = {}
    for i, e in enumerate(ids):
        if len(e) <= max_prompt_tokens:
            continue
        msg = tokenizer(prompts[i], add_special_tokens=False)["input_ids"]
        overhead = len(e) - len(msg)
        keep = max_prompt_tokens - overhead
        if keep < 1:
            raise TraceError(f"the chat template alone takes {overhead} tokens, more than the {max_prompt_tokens} "
                             "left for a prompt; allow longer prompts (or fewer new tokens)")
        e2 = encode([tokenizer.decode(msg[:keep], skip_special_tokens=True)])[0]
        while len(e2) > max_prompt_tokens and keep > 1:  # re-tokenizing at the cut can add a token or two
            keep -= max(1, len(e2) - max_prompt_tokens)
            e2 = encode([tokenizer.decode(msg[:keep], skip_special_tokens=True)])[0]
        reason = (f"prompt of {len(e)} tokens cut to {len(e2)} (its user message to {keep} of {len(msg)} tokens)"
                  + (f" {why}" if why else ""))
        warnings.warn(f"prompt {i}: {reason}", stacklevel=3)
        truncated[i] = reason
        ids[i] = e2
    return ids, truncated


def prompt_batches(tokenizer, prompts: Sequence[str], batch_size: int = 8, chat: bool = True,
                   max_length: int = 256) -> Iterator[dict[str, torch.Tensor]]:
    """Right-padded batches of (chat-formatted) prompts; a prompt longer than ``max_length`` tokens has its
    user message cut (with a warning) so the template's post-instruction tokens stay (:func:`encode_prompts`)."""
    if not prompts:
        raise DatasetError("no prompts to run: the dataset or category is empty")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    all_ids, _ = encode_prompts(tokenizer, prompts, max_length, chat, why=f"to fit {max_length} tokens")
    for i in range(0, len(all_ids), batch_size):
        enc = all_ids[i: i + batch_size]
        width = max(len(e) for e in enc)
        ids = torch.full((len(enc), width), pad, dtype=torch.long)
        mask = torch.zeros((len(enc), width), dtype=torch.long)
        for row, e in enumerate(enc):
            ids[row, : len(e)] = torch.tensor(e, dtype=torch.long)
            mask[row, : len(e)] = 1
        yield {"input_ids": ids, "attention_mask": mask}
