"""Token batches for both models: packed text chunks and chat-formatted prompts.

Both the reference and every variant read exactly these tensors. Prompts are right-padded: Hugging Face
models number positions from 0 regardless of padding, so right padding keeps every real token at the
position it has unpadded, and causal attention keeps padding from affecting real tokens.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence

import torch

from trace_lib.errors import DatasetError


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


def prompt_batches(tokenizer, prompts: Sequence[str], batch_size: int = 8, chat: bool = True,
                   max_length: int = 256) -> Iterator[dict[str, torch.Tensor]]:
    """Right-padded batches of (chat-formatted) prompts; longer prompts are truncated to ``max_length``."""
    if not prompts:
        raise DatasetError("no prompts to run: the dataset or category is empty")
    texts = format_prompts(tokenizer, prompts, chat)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for i in range(0, len(texts), batch_size):
        enc = [tokenizer(t, add_special_tokens=not chat)["input_ids"] for t in texts[i: i + batch_size]]
        for j, e in enumerate(enc):
            if len(e) > max_length:
                warnings.warn(f"prompt {i + j} has {len(e)} tokens; only the first {max_length} are used "
                              "(its end, and the template's post-instruction tokens, are cut)", stacklevel=2)
        enc = [e[:max_length] for e in enc]
        width = max(len(e) for e in enc)
        ids = torch.full((len(enc), width), pad, dtype=torch.long)
        mask = torch.zeros((len(enc), width), dtype=torch.long)
        for row, e in enumerate(enc):
            ids[row, : len(e)] = torch.tensor(e, dtype=torch.long)
            mask[row, : len(e)] = 1
        yield {"input_ids": ids, "attention_mask": mask}
