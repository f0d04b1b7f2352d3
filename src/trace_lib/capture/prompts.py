"""Activations of chat prompts, token by token, with each token's prompt and position recorded.

Refusal is decided at the *post-instruction* tokens: the chat template's tokens after the user's message
(for SmolLM2 ``<|im_end|>``, ``\\n``, ``<|im_start|>``, ``assistant``, ``\\n``), where the model reads the whole
request and prepares its answer (Arditi et al. 2024, "Refusal in Language Models Is Mediated by a Single
Direction", take their directions there). :func:`post_instruction_length` finds how many there are for a
tokenizer; :class:`PromptActs` keeps every real token's position from the end so any position set can be
selected afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from trace_lib.capture.hooks import HookConfig, iter_activations
from trace_lib.capture.inputs import prompt_batches
from trace_lib.errors import DatasetError
from trace_lib.progress import track

_SENTINEL = "Zq7xSENTINELxq7Z"


def _template_parts(tokenizer) -> tuple[str, str] | None:
    if not getattr(tokenizer, "chat_template", None):
        return None
    text = tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL}], tokenize=False,
                                         add_generation_prompt=True)
    i = text.index(_SENTINEL)
    return text[:i], text[i + len(_SENTINEL):]


def post_instruction_length(tokenizer) -> int:
    """Number of chat-template tokens after the user's message (0 for a tokenizer with no template)."""
    parts = _template_parts(tokenizer)
    return len(tokenizer(parts[1], add_special_tokens=False)["input_ids"]) if parts else 0


def pre_instruction_length(tokenizer) -> int:
    """Number of chat-template tokens before the user's message (system prompt, role markers)."""
    parts = _template_parts(tokenizer)
    return len(tokenizer(parts[0], add_special_tokens=False)["input_ids"]) if parts else 0


@dataclass
class PromptActs:
    """Activations of every real token of a list of prompts (position 0 left out, see ``capture.buffer``).

    ``acts[hook]`` is [n_tokens, d]; ``prompt`` [n_tokens] the prompt index of each token; ``position`` its
    position in the prompt; ``from_end`` its distance from the prompt's last token (0 = last token);
    ``n_pre`` / ``n_post`` the number of chat-template tokens before / after the user's message.
    """

    acts: dict[str, torch.Tensor]
    prompt: torch.Tensor
    position: torch.Tensor
    from_end: torch.Tensor
    n_prompts: int
    n_pre: int
    n_post: int
    token: torch.Tensor | None = None  # [n_tokens] token ids (for showing examples)

    def select(self, where: str = "post_instruction") -> torch.Tensor:
        """Boolean token mask: ``"post_instruction"``, ``"last"``, ``"instruction"`` (the user's message and
        what follows it: the template's system prompt left out) or ``"all"``."""
        if where == "all":
            return torch.ones_like(self.prompt, dtype=torch.bool)
        if where == "instruction":
            return self.position >= self.n_pre
        if where == "last":
            return self.from_end == 0
        if where == "post_instruction":
            return self.from_end < max(self.n_post, 1)
        raise ValueError(f"unknown position set {where!r}: use post_instruction, last, instruction or all")

    def context(self, i: int, tokenizer, before: int = 16, after: int = 3) -> tuple[str, str, str]:
        """Text around token ``i`` (an index into the token arrays): (left context, the token, right context)."""
        same = (self.prompt == self.prompt[i]).nonzero().squeeze(1)
        pos = int(self.position[i])
        left = [int(self.token[j]) for j in same if pos - before <= int(self.position[j]) < pos]
        right = [int(self.token[j]) for j in same if pos < int(self.position[j]) <= pos + after]
        return tokenizer.decode(left), tokenizer.decode([int(self.token[i])]), tokenizer.decode(right)

    def per_prompt(self, values: torch.Tensor, where: str = "post_instruction", reduce: str = "max") -> torch.Tensor:
        """Reduce token-level ``values`` [n_tokens, k] to one row per prompt [n_prompts, k] over ``where``."""
        mask = self.select(where)
        vals, idx = values[mask], self.prompt[mask]
        out = torch.zeros(self.n_prompts, values.shape[1], dtype=values.dtype)
        if reduce == "max":
            out.fill_(float("-inf"))
            out.scatter_reduce_(0, idx[:, None].expand_as(vals), vals, reduce="amax")
        elif reduce == "mean":
            out.index_add_(0, idx, vals)
            out /= torch.bincount(idx, minlength=self.n_prompts).clamp(min=1)[:, None].to(values.dtype)
        else:
            raise ValueError(f"unknown reduction {reduce!r}")
        return out


def capture_prompts(loaded, prompts: Sequence[str], hook_names: Sequence[str], batch_size: int = 16,
                    chat: bool = True, max_length: int = 256, description: str = "reading prompts") -> PromptActs:
    """Run ``prompts`` (chat-formatted) through ``loaded`` and keep ``hook_names`` for every real token."""
    if not prompts:
        raise DatasetError("no prompts given: the dataset, split or category is empty")
    names = [loaded.arch.resolve(n) for n in hook_names]
    batches = list(prompt_batches(loaded.tokenizer, prompts, batch_size=batch_size, chat=chat, max_length=max_length))
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    prompt_ids, positions, from_end, tokens = [], [], [], []
    offset = 0
    stream = iter_activations(loaded, batches, HookConfig(layers=[], hook_points=(), names=tuple(names)))
    for batch, cb in zip(batches, track(stream, description, total=len(batches))):
        mask = batch["attention_mask"].bool().clone()
        mask[:, 0] = False
        lengths = batch["attention_mask"].sum(1)
        pos = torch.arange(mask.shape[1]).expand_as(mask)
        prompt_ids.append((torch.arange(len(mask))[:, None] + offset).expand_as(mask)[mask])
        positions.append(pos[mask])
        tokens.append(batch["input_ids"][mask])
        from_end.append((lengths[:, None] - 1 - pos)[mask])
        for n in names:
            parts[n].append(cb.acts[n][mask])
        offset += len(mask)
    return PromptActs({n: torch.cat(v) for n, v in parts.items()}, torch.cat(prompt_ids), torch.cat(positions),
                      torch.cat(from_end), offset, pre_instruction_length(loaded.tokenizer) if chat else 0,
                      post_instruction_length(loaded.tokenizer) if chat else 0, torch.cat(tokens))
