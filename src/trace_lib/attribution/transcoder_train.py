"""Training per-layer transcoders: seeded, Adam, MSE plus a sparsity penalty, one layer after another.

For block l, pairs ``(x, y)`` = (the MLP's input, the MLP's output) are collected for every token of the
training text (position 0 left out by default, like SAE training: the attention sink is no typical token),
and a :class:`~trace_lib.attribution.transcoder.Transcoder` minimises, over batches::

    L = sum_d (y^ - y)^2  +  lambda * S(a),        mean over the batch

with inputs and targets scaled to mean norm ``sqrt(d_model)`` during training (the SAE trainer's
``expected_average_only_in``, applied to both sides; folded into the weights at the end, so the result works on
raw activations) and the sparsity penalty S one of

* ``tanh`` (default): ``sum_i tanh(c * a_i ||W_dec,i||)`` (Anthropic, "Circuit Tracing" 2025, §2.1 and its
  training appendix; c = ``tanh_scale``);
* ``l1``: ``sum_i a_i ||W_dec,i||`` (the SAE trainer's ReLU penalty);
* ``l0``: the number of active latents through the straight-through Heaviside of
  :mod:`trace_lib.sae.jumprelu` (JumpReLU only; thresholds trained as ``exp(log theta)``).

The JumpReLU forward pass uses the same straight-through estimator as the SAE trainer. Adam (betas 0.9/0.999),
linear learning-rate warm-up over the first 5% of steps and decay to 0 over the last 20% (the SAE trainer's
schedule), the sparsity coefficient warmed up over the first 5%, global grad-norm clip 1.0. The same data,
arguments and seed give the same weights (CPU).

This trainer is meant for small models and tests (it holds every layer's pairs in memory:
``n_tokens x n_layers x 2 x d_model`` floats); transcoders for a real model want the streaming machinery of
:mod:`trace_lib.sae.training`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

from trace_lib.attribution.transcoder import ACTIVATIONS, Transcoder, TranscoderSet
from trace_lib.capture.inputs import pack_texts
from trace_lib.capture.registry import register_hook
from trace_lib.errors import TranscoderError
from trace_lib.sae.jumprelu import JumpReLU, Step
from trace_lib.sae.training.config import resolve_device
from trace_lib.validate import POSITIVE, POSITIVE_INT, check_choice

SPARSITY = ("tanh", "l1", "l0")


def mlp_pairs(loaded, ids: torch.Tensor, batch_size: int = 8, skip_first: bool = True
              ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer ``(x, y)`` [n_tokens, d_model] float32 CPU: every MLP's input and output on ``ids`` [n, seq]."""
    store: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {i: [] for i in range(loaded.n_layers)}
    start = 1 if skip_first else 0

    def hook(layer: int):
        def fn(module, args, output):
            x, y = args[0][:, start:], output[:, start:]
            store[layer].append((x.detach().float().reshape(-1, x.shape[-1]).cpu(),
                                 y.detach().float().reshape(-1, y.shape[-1]).cpu()))
        return fn

    handles = [register_hook(block.mlp, hook(i), hook_name=f"blocks.{i}.mlp", kind="capture",
                             owner="train_transcoders") for i, block in enumerate(loaded.arch.layers)]
    dev = loaded.arch.embed.weight.device
    try:
        with torch.no_grad():
            for i in range(0, len(ids), batch_size):
                loaded.model(input_ids=ids[i:i + batch_size].to(dev), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [(torch.cat([p[0] for p in store[i]]), torch.cat([p[1] for p in store[i]])) for i in store]


def _token_ids(loaded, texts: Sequence[str] | torch.Tensor, seq_len: int, max_sequences: int | None) -> torch.Tensor:
    if isinstance(texts, torch.Tensor):
        if texts.dim() != 2 or texts.dtype not in (torch.int64, torch.int32):
            raise TranscoderError("token ids for transcoder training must be an integer tensor [n_sequences, seq_len]")
        return texts.long()[:max_sequences] if max_sequences else texts.long()
    if loaded.tokenizer is None:
        raise TranscoderError("training on text needs a tokenizer; this model has none: give token ids [n, seq_len]")
    return pack_texts(loaded.tokenizer, list(texts), seq_len, max_sequences)


def scale_factor(t: torch.Tensor) -> float:
    """``sqrt(d) / mean_i ||t_i||``: scales rows to mean norm ``sqrt(d)`` (the SAE trainer's normalisation)."""
    mean_norm = t.double().norm(dim=1).mean().item()
    return math.sqrt(t.shape[1]) / mean_norm if mean_norm > 0 else 1.0


def init_transcoder(d: int, d_tc: int, layer: int, activation: str, skip: bool, seed: int, b_dec: torch.Tensor,
                    device: torch.device) -> tuple[Transcoder, torch.nn.Parameter | None]:
    """A seeded fresh transcoder (in scaled units): unit-direction decoder rows of norm 0.1, encoder
    ``N(0, 1/d)``, ``b_dec`` the mean target; with JumpReLU also its log-thresholds (log 0.1)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + layer)
    tc = Transcoder(d, d_tc, layer, activation, skip).to(device)
    with torch.no_grad():
        w_dec = torch.randn(d_tc, d, generator=g)
        tc.W_dec.copy_(w_dec / w_dec.norm(dim=1, keepdim=True) * 0.1)
        tc.W_enc.copy_(torch.randn(d, d_tc, generator=g) / math.sqrt(d))
        tc.b_dec.copy_(b_dec)
    log_thr = None
    if activation == "jumprelu":
        log_thr = torch.nn.Parameter(torch.full((d_tc,), math.log(0.1), device=device))
    return tc, log_thr


def fit_transcoder(tc: Transcoder, log_thr: torch.nn.Parameter | None,
                   batches: Iterator[tuple[torch.Tensor, torch.Tensor]], steps: int, *, sparsity: str,
                   coefficient: float, tanh_scale: float, lr: float, bandwidth: float = 0.05) -> None:
    """``steps`` Adam steps on ``(x, y)`` batches already in scaled units (module docstring for the loss and
    schedule); shared by the in-memory trainer and the streaming builder."""
    params = [tc.W_enc, tc.b_enc, tc.W_dec, tc.b_dec] + ([tc.W_skip] if tc.has_skip else [])
    if log_thr is not None:
        params.append(log_thr)
    opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999))
    warm, decay = max(1, steps // 20), max(1, steps // 5)
    for step in range(steps):
        xb, yb = next(batches)
        pre = tc.pre(xb)
        if log_thr is not None:
            a = JumpReLU.apply(pre, torch.exp(log_thr), bandwidth)
        else:
            a = torch.relu(pre)
        y_hat = a @ tc.W_dec + tc.b_dec + tc.skip(xb)
        mse = (y_hat - yb).pow(2).sum(-1).mean()
        norms = tc.W_dec.norm(dim=1)
        if sparsity == "tanh":
            penalty = torch.tanh(tanh_scale * a * norms).sum(-1).mean()
        elif sparsity == "l1":
            penalty = (a * norms).sum(-1).mean()
        else:
            penalty = Step.apply(pre, torch.exp(log_thr), bandwidth).sum(-1).mean()
        loss = mse + coefficient * min(1.0, (step + 1) / warm) * penalty
        for group in opt.param_groups:
            group["lr"] = lr * min((step + 1) / warm, 1.0, (steps - step) / decay)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()


@torch.no_grad()
def fold_scales(tc: Transcoder, log_thr: torch.nn.Parameter | None, s_in: float, s_out: float) -> Transcoder:
    """Fold the training scales into the weights (the result works on raw activations); CPU copy."""
    tc.W_enc.mul_(s_in)
    tc.W_dec.div_(s_out)
    tc.b_dec.div_(s_out)
    if tc.has_skip:
        tc.W_skip.mul_(s_in / s_out)
    if log_thr is not None:
        tc.threshold.copy_(torch.exp(log_thr))
    return tc.cpu()


def _train_layer(x: torch.Tensor, y: torch.Tensor, layer: int, d_tc: int, activation: str, skip: bool,
                 sparsity: str, coefficient: float, tanh_scale: float, steps: int, batch_size: int, lr: float,
                 seed: int, device: torch.device, bandwidth: float = 0.05) -> tuple[Transcoder, dict]:
    d = x.shape[1]
    s_in, s_out = scale_factor(x), scale_factor(y)
    xs, ys = (x * s_in).to(device), (y * s_out).to(device)
    tc, log_thr = init_transcoder(d, d_tc, layer, activation, skip, seed, ys.mean(0), device)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.Generator().manual_seed(seed + 7919 * (layer + 1))
        perm, cursor = torch.randperm(len(xs), generator=order), 0
        while True:
            if cursor + batch_size > len(perm):
                perm, cursor = torch.randperm(len(xs), generator=order), 0
            idx = perm[cursor:cursor + batch_size].to(device)
            cursor += batch_size
            yield xs[idx], ys[idx]

    fit_transcoder(tc, log_thr, batches(), steps, sparsity=sparsity, coefficient=coefficient,
                   tanh_scale=tanh_scale, lr=lr, bandwidth=bandwidth)
    tc = fold_scales(tc, log_thr, s_in, s_out)
    return tc, transcoder_fit(tc, x, y)


@torch.no_grad()
def transcoder_fit(tc: Transcoder, x: torch.Tensor, y: torch.Tensor) -> dict:
    """``fvu`` (unexplained variance of the MLP output, ``sum (y - y^)^2 / sum (y - mean y)^2``) and mean ``l0``."""
    a = tc.encode(x)
    err = (tc.decode(a, x) - y).pow(2).sum()
    var = (y - y.mean(0)).pow(2).sum()
    return {"fvu": float(err / var) if var > 0 else float("nan"), "l0": float((a != 0).sum(-1).float().mean())}


def train_transcoders(loaded, texts: Sequence[str] | torch.Tensor, *, d_transcoder: int | None = None,
                      activation: str = "relu", skip: bool = False, sparsity: str = "tanh",
                      sparsity_coefficient: float = 1.0, tanh_scale: float = 1.0, steps: int = 300,
                      batch_size: int = 256, lr: float = 3e-3, seq_len: int = 64, max_sequences: int | None = None,
                      seed: int = 0, skip_first: bool = True, device: str = "cpu",
                      scan: str | None = None) -> TranscoderSet:
    """Train one transcoder per block of ``loaded`` on ``texts`` (strings, packed into ``seq_len`` chunks, or
    token ids [n, seq_len]); width ``d_transcoder`` (default 4 x d_model). Module docstring for the loss.
    The set's ``info`` holds each layer's ``fvu`` and ``l0`` on the training tokens."""
    check_choice("activation", activation, ACTIVATIONS)
    check_choice("sparsity", sparsity, SPARSITY)
    if sparsity == "l0" and activation != "jumprelu":
        raise TranscoderError("the l0 penalty trains JumpReLU thresholds: use activation='jumprelu' or another sparsity")
    for name, v in (("steps", steps), ("batch_size", batch_size), ("seq_len", seq_len), ("d_transcoder", d_transcoder),
                    ("max_sequences", max_sequences)):
        POSITIVE_INT.check(name, v)
    for name, v in (("lr", lr), ("tanh_scale", tanh_scale)):
        POSITIVE.check(name, v)
    if not sparsity_coefficient >= 0:
        raise TranscoderError(f"sparsity_coefficient must be >= 0, not {sparsity_coefficient}")
    ids = _token_ids(loaded, texts, seq_len, max_sequences)
    pairs = mlp_pairs(loaded, ids, skip_first=skip_first)
    if len(pairs[0][0]) < batch_size:
        raise TranscoderError(f"only {len(pairs[0][0])} training tokens for batches of {batch_size}: "
                              "give more text or a smaller batch_size")
    width = d_transcoder or 4 * loaded.d_model
    dev = resolve_device(device)
    tcs, info = [], {}
    for layer, (x, y) in enumerate(pairs):
        tc, fit = _train_layer(x, y, layer, width, activation, skip, sparsity, sparsity_coefficient, tanh_scale,
                               steps, batch_size, lr, seed, dev)
        tcs.append(tc)
        info[layer] = fit
    out = TranscoderSet(tcs, scan=scan or f"trace-{loaded.name}-{loaded.content_hash}")
    out.info = {"n_tokens": len(pairs[0][0]), "seed": seed, "layers": info}
    return out
