"""One sparse autoencoder class for the three architectures trace reads: ReLU, TopK and JumpReLU.

Parameter names, shapes and encode semantics follow SAELens (``sae_lens/saes/standard_sae.py``,
``topk_sae.py``, ``jumprelu_sae.py``) so that an SAE saved by either library gives the same codes in the other:

* ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec [d_in]``, and for JumpReLU
  ``threshold [d_sae]``.
* ``sae_in = x * s - b_dec * apply_b_dec_to_input`` where ``s`` is the input scaling factor (1 unless
  ``normalize_activations == "expected_average_only_in"`` with a known ``norm_scaling_factor``);
  ``pre = sae_in @ W_enc + b_enc``.
* relu: ``ReLU(pre)``.
* topk: SAELens keeps the k largest *pre-activations* and applies ReLU to those k values
  (``TopK.forward``: ``topk`` then ``postact_fn``); every other latent is 0. EleutherAI sparsify applies
  ReLU first and then takes the top k; both give the same code vector (they differ only in which zero
  entries are "selected"). A row therefore has *at most* k non-zeros, exactly k whenever at least k
  pre-activations are positive.
* jumprelu: ``ReLU(pre) * (pre > threshold)``, as SAELens's ``JumpReLUSAE.encode``.
* decode: ``(z @ W_dec + b_dec) / s``.

Callers always work in raw activation units: the scaling factor (if any) is applied inside ``encode`` and
undone inside ``decode``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn

from trace_lib.errors import SAEError

SUPPORTED_ARCHITECTURES = ("relu", "topk", "jumprelu")
SUPPORTED_NORMALIZATIONS = ("none", "expected_average_only_in")

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "double": torch.float64,
}


def dtype_from_str(name: str | torch.dtype) -> torch.dtype:
    """``"float32"``/``"torch.float32"``/``torch.float32`` -> ``torch.float32`` (SAEError for anything else)."""
    if isinstance(name, torch.dtype):
        if name not in _DTYPES.values():
            raise SAEError(f"unsupported SAE dtype {name}: use one of float32, float16, bfloat16, float64")
        return name
    key = str(name).strip().lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise SAEError(f"unsupported SAE dtype '{name}': use one of float32, float16, bfloat16, float64")
    return _DTYPES[key]


def dtype_to_str(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


_LAYER_RE = re.compile(r"^blocks\.(\d+)\.")


def hook_layer(hook_name: str) -> int | None:
    """The block index in a TransformerLens hook name (``blocks.5.hook_resid_post`` -> 5), else None."""
    m = _LAYER_RE.match(hook_name or "")
    return int(m.group(1)) if m else None


@dataclass
class SAEConfig:
    """What an SAE is: its shape, activation, where it reads the model, and how inputs are scaled.

    ``normalize_activations`` uses SAELens's names: ``"none"`` or ``"expected_average_only_in"`` (Anthropic's
    April 2024 update: inputs are multiplied by a fixed scalar ``norm_scaling_factor`` estimated on the
    training data as ``sqrt(d_in) / mean ||x||``, as SAELens's ``ActivationScaler.estimate_scaling_factor``
    does). With ``"expected_average_only_in"`` and ``norm_scaling_factor=None`` the input is not scaled,
    which is what SAELens itself does at inference time (it expects the factor to be folded into the weights).
    """

    d_in: int
    d_sae: int
    architecture: str = "topk"
    k: int | None = None
    hook_name: str = ""
    normalize_activations: str = "none"
    norm_scaling_factor: float | None = None
    apply_b_dec_to_input: bool = True
    dtype: str = "float32"
    model_name: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.dtype, torch.dtype):
            self.dtype = dtype_to_str(self.dtype)
        self.dtype = dtype_to_str(dtype_from_str(self.dtype))
        for name in ("d_in", "d_sae"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SAEError(f"SAE {name} must be a positive integer, got {value!r}")
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise SAEError(
                f"unknown SAE architecture '{self.architecture}': trace supports {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.architecture == "topk":
            if self.k is None or isinstance(self.k, bool) or not isinstance(self.k, int):
                raise SAEError(f"a topk SAE needs an integer k (1..d_sae={self.d_sae}), got {self.k!r}")
            if not 1 <= self.k <= self.d_sae:
                raise SAEError(f"topk k={self.k} must be between 1 and d_sae={self.d_sae}")
        if isinstance(self.normalize_activations, bool):  # SAELens's old boolean form
            self.normalize_activations = "expected_average_only_in" if self.normalize_activations else "none"
        if self.normalize_activations is None:
            self.normalize_activations = "none"
        if self.normalize_activations not in SUPPORTED_NORMALIZATIONS:
            raise SAEError(
                f"unsupported normalize_activations '{self.normalize_activations}': trace supports "
                f"{', '.join(SUPPORTED_NORMALIZATIONS)}"
            )
        if self.norm_scaling_factor is not None:
            s = float(self.norm_scaling_factor)
            if not math.isfinite(s) or s <= 0:
                raise SAEError(f"norm_scaling_factor must be a positive finite number, got {self.norm_scaling_factor!r}")
            self.norm_scaling_factor = s
        self.metadata = dict(self.metadata or {})

    @property
    def input_scale(self) -> float | None:
        """The factor ``encode`` multiplies inputs by (None: no scaling)."""
        if self.normalize_activations == "expected_average_only_in" and self.norm_scaling_factor is not None:
            return self.norm_scaling_factor
        return None

    @property
    def torch_dtype(self) -> torch.dtype:
        return dtype_from_str(self.dtype)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAEConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class SAE(nn.Module):
    """A sparse autoencoder with SAELens parameter names (see module docstring for the maths).

    Parameters start at zero; set them (``sae.W_enc.data.copy_(...)``), load them with
    :func:`trace_lib.sae.load_sae`, or train them with :func:`trace_lib.sae.train_sae`.
    """

    def __init__(self, cfg: SAEConfig, device: str | torch.device = "cpu"):
        super().__init__()
        self.cfg = cfg
        dt = cfg.torch_dtype
        self.W_enc = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_sae, dtype=dt, device=device))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dt, device=device))
        self.W_dec = nn.Parameter(torch.zeros(cfg.d_sae, cfg.d_in, dtype=dt, device=device))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, dtype=dt, device=device))
        if cfg.architecture == "jumprelu":
            self.threshold = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dt, device=device))
        else:
            self.threshold = None

    # ------------------------------------------------------------------ properties
    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def hook_name(self) -> str:
        return self.cfg.hook_name

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    def content_hash(self) -> str:
        """sha256 (64 hex digits) of everything that fixes what ``encode`` and ``decode`` compute.

        Hashed in a fixed order: a JSON header of architecture, d_in, d_sae, k (topk only), the effective
        input scale (:attr:`SAEConfig.input_scale`), apply_b_dec_to_input and the parameters' dtype; then for
        each of ``W_enc``, ``b_enc``, ``W_dec``, ``b_dec``, ``threshold`` (jumprelu) its name, shape and
        float32 C-contiguous bytes. Names, hooks and metadata are left out, so an SAE and its SAELens-format
        copy hash alike (``save_sae`` folds an input scaling factor into the weights, which changes them),
        and SAEs differing in any weight (biases and thresholds included) differ. Use it wherever a cache or
        a check keys on an SAE.
        """
        c = self.cfg
        header = {"architecture": c.architecture, "d_in": c.d_in, "d_sae": c.d_sae,
                  "k": c.k if c.architecture == "topk" else None, "input_scale": c.input_scale,
                  "apply_b_dec_to_input": bool(c.apply_b_dec_to_input), "dtype": dtype_to_str(self.dtype)}
        h = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
            t = getattr(self, name)
            if t is None:
                continue
            w = t.detach().to("cpu", torch.float32).contiguous()
            h.update(f"{name}:{list(w.shape)}".encode())
            h.update(w.numpy().tobytes())
        return h.hexdigest()

    def extra_repr(self) -> str:
        c = self.cfg
        k = f", k={c.k}" if c.architecture == "topk" else ""
        return f"{c.architecture}, d_in={c.d_in}, d_sae={c.d_sae}{k}, hook={c.hook_name!r}"

    # ------------------------------------------------------------------ maths
    def _check_in(self, x: torch.Tensor, width: int, what: str) -> None:
        if x.shape[-1] != width:
            raise SAEError(
                f"SAE for {self.cfg.hook_name or '?'} expects {what} with last dimension {width}, "
                f"got shape {list(x.shape)}: pass activations from the hook the SAE was trained on"
            )

    def process_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x * s - b_dec * apply_b_dec_to_input`` in the SAE's dtype (SAELens's ``process_sae_in``)."""
        self._check_in(x, self.cfg.d_in, "activations")
        x = x.to(device=self.device, dtype=self.dtype)
        s = self.cfg.input_scale
        if s is not None:
            x = x * s
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x

    def encode_pre(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-activations ``process_input(x) @ W_enc + b_enc`` ([..., d_sae])."""
        return self.process_input(x) @ self.W_enc + self.b_enc

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        """Map pre-activations to codes with this SAE's activation function."""
        arch = self.cfg.architecture
        if arch == "relu":
            return torch.relu(pre)
        if arch == "topk":
            k = int(self.cfg.k)  # type: ignore[arg-type]
            top = torch.topk(pre, k=k, dim=-1)
            out = torch.zeros_like(pre)
            out.scatter_(-1, top.indices, torch.relu(top.values))
            return out
        assert self.threshold is not None
        return torch.relu(pre) * (pre > self.threshold).to(pre.dtype)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Codes [..., d_sae] for activations x [..., d_in] (raw units)."""
        return self.activation(self.encode_pre(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Reconstruction [..., d_in] in raw activation units from codes z [..., d_sae]."""
        self._check_in(z, self.cfg.d_sae, "codes")
        z = z.to(device=self.device, dtype=self.dtype)
        out = z @ self.W_dec + self.b_dec
        s = self.cfg.input_scale
        if s is not None:
            out = out / s
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``decode(encode(x))``."""
        return self.decode(self.encode(x))

    # ------------------------------------------------------------------ weight surgery
    @torch.no_grad()
    def fold_scaling_factor(self) -> SAE:
        """Fold the input scaling factor into the weights, as SAELens's ``fold_activation_norm_scaling_factor``.

        ``W_enc *= s``, ``W_dec /= s``, ``b_dec /= s`` leaves pre-activations (hence codes, thresholds and
        biases) and reconstructions unchanged up to rounding, and makes the SAE loadable by SAELens, which
        ignores a stored factor at inference. Sets ``normalize_activations="none"`` and records the factor in
        ``cfg.metadata["norm_scaling_factor_folded"]``. No-op if there is no factor.
        """
        s = self.cfg.input_scale
        if s is None:
            return self
        self.W_enc.mul_(s)
        self.W_dec.div_(s)
        self.b_dec.div_(s)
        self.cfg.normalize_activations = "none"
        self.cfg.norm_scaling_factor = None
        self.cfg.metadata["norm_scaling_factor_folded"] = s
        return self

    @torch.no_grad()
    def normalize_decoder(self) -> SAE:
        """Rescale each decoder row (one latent's direction) to unit L2 norm."""
        eps = torch.finfo(self.W_dec.dtype).eps
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True) + eps)
        return self
