"""Per-layer transcoders (PLTs): sparse replacements of each MLP, the nodes of an attribution graph.

A transcoder for block l reads what the MLP reads (the normalised residual stream, the output of the
post-attention norm: TransformerLens ``blocks.l.ln2.hook_normalized``, circuit-tracer ``mlp.hook_in``) and
predicts what the MLP adds to the residual stream (``blocks.l.hook_mlp_out``, circuit-tracer ``mlp.hook_out``)::

    pre  = x @ W_enc + b_enc                       W_enc [d_model, d_tc], b_enc [d_tc]
    a    = ReLU(pre)  or  pre * (pre > threshold)  (JumpReLU, circuit-tracer's ``jumprelu``)
    y^   = a @ W_dec + b_dec + x @ W_skip^T        W_dec [d_tc, d_model], b_dec [d_model], W_skip [d_model, d_model]

(Dunefsky et al. 2024, "Transcoders find interpretable LLM feature circuits"; the optional linear skip is
Paulo et al. 2025, arXiv:2501.18823; the graphs built on them: Ameisen et al. 2025, "Circuit Tracing".)

On disk a :class:`TranscoderSet` uses circuit-tracer's ``transcoder_set`` layout (its
``utils/caching.load_transcoders_from_cache`` and ``transcoder/single_layer_transcoder.load_relu_transcoder``
read it): a folder with ``config.yaml`` (``model_kind: transcoder_set``, ``feature_input_hook``,
``feature_output_hook``, ``scan``) and one ``layer_{i}.safetensors`` per layer holding ``W_enc [d_tc, d_model]``
(circuit-tracer applies it with ``F.linear``, so it is the transpose of trace's ``W_enc``), ``W_dec [d_tc,
d_model]``, ``b_enc [d_tc]``, ``b_dec [d_model]``, optionally ``W_skip [d_model, d_model]`` and, for JumpReLU,
``activation_function.threshold [d_tc]``. Nothing else may be in the file: circuit-tracer loads it with a strict
``load_state_dict``. Weights are read with safetensors only (never pickle).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from trace_lib.cache import atomic_dir
from trace_lib.errors import TranscoderError

ACTIVATIONS = ("relu", "jumprelu")
# What a transcoder may read and write, as circuit-tracer's config names them (relative to ``blocks.{l}.``): the
# MLP's input (the post-attention norm's output) and the MLP's output. trace writes the first name of each.
INPUT_HOOKS = ("mlp.hook_in", "ln2.hook_normalized")
OUTPUT_HOOKS = ("mlp.hook_out", "hook_mlp_out")
CONFIG_FILE = "config.yaml"
_THRESHOLD_KEYS = ("activation_function.threshold", "threshold")


class Transcoder(nn.Module):
    """One layer's transcoder (module docstring for the formulas). Parameters are float32 by default."""

    def __init__(self, d_model: int, d_transcoder: int, layer: int, activation: str = "relu",
                 skip: bool = False, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise TranscoderError(f"unknown transcoder activation {activation!r}: use one of {', '.join(ACTIVATIONS)}")
        for name, v in (("d_model", d_model), ("d_transcoder", d_transcoder)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise TranscoderError(f"transcoder {name} must be a positive integer, got {v!r}")
        self.d_model, self.d_transcoder, self.layer, self.activation = d_model, d_transcoder, layer, activation
        self.W_enc = nn.Parameter(torch.zeros(d_model, d_transcoder, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(d_transcoder, dtype=dtype))
        self.W_dec = nn.Parameter(torch.zeros(d_transcoder, d_model, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d_model, dtype=dtype))
        self.W_skip = nn.Parameter(torch.zeros(d_model, d_model, dtype=dtype)) if skip else None
        self.threshold = nn.Parameter(torch.zeros(d_transcoder, dtype=dtype)) if activation == "jumprelu" else None

    @property
    def has_skip(self) -> bool:
        return self.W_skip is not None

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-activations ``x @ W_enc + b_enc`` (the quantity an attribution graph decomposes)."""
        return x.to(self.W_enc.dtype) @ self.W_enc + self.b_enc

    def act(self, pre: torch.Tensor) -> torch.Tensor:
        """ReLU, or circuit-tracer's JumpReLU ``pre * (pre > threshold)``."""
        if self.threshold is None:
            return torch.relu(pre)
        return pre * (pre > self.threshold).to(pre.dtype)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.pre(x))

    def skip(self, x: torch.Tensor) -> torch.Tensor:
        """The linear skip ``x @ W_skip^T`` (zeros without one); linear, so gradients flow through it."""
        if self.W_skip is None:
            return torch.zeros(*x.shape[:-1], self.d_model, dtype=self.W_dec.dtype, device=x.device)
        return x.to(self.W_skip.dtype) @ self.W_skip.T

    def decode(self, acts: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return acts @ self.W_dec + self.b_dec + self.skip(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x), x)

    def state(self) -> dict[str, torch.Tensor]:
        """The tensors in circuit-tracer's file layout (``W_enc`` transposed to ``[d_tc, d_model]``)."""
        out = {"W_enc": self.W_enc.detach().T.contiguous(), "W_dec": self.W_dec.detach().contiguous(),
               "b_enc": self.b_enc.detach().contiguous(), "b_dec": self.b_dec.detach().contiguous()}
        if self.threshold is not None:
            out["activation_function.threshold"] = self.threshold.detach().contiguous()
        if self.W_skip is not None:
            out["W_skip"] = self.W_skip.detach().contiguous()
        return out

    @classmethod
    def from_state(cls, tensors: Mapping[str, torch.Tensor], layer: int, where: str = "") -> Transcoder:
        """A transcoder from circuit-tracer-layout tensors (``threshold`` is accepted for the threshold too)."""
        where = where or f"layer {layer}"
        missing = [k for k in ("W_enc", "W_dec", "b_enc", "b_dec") if k not in tensors]
        if missing:
            raise TranscoderError(f"transcoder {where} lacks {', '.join(missing)}: a circuit-tracer transcoder holds "
                                  "W_enc, W_dec, b_enc, b_dec (and optionally W_skip, activation_function.threshold)")
        d_tc, d_model = tensors["b_enc"].shape[0], tensors["b_dec"].shape[0]
        thr = next((tensors[k] for k in _THRESHOLD_KEYS if k in tensors), None)
        want = {"W_enc": (d_tc, d_model), "W_dec": (d_tc, d_model), "W_skip": (d_model, d_model),
                "activation_function.threshold": (d_tc,), "threshold": (d_tc,)}
        for k, shape in want.items():
            if k in tensors and tuple(tensors[k].shape) != shape:
                raise TranscoderError(f"transcoder {where}: {k} has shape {tuple(tensors[k].shape)}, expected {shape} "
                                      f"(from b_enc [{d_tc}] and b_dec [{d_model}])")
        dtype = tensors["W_enc"].dtype
        tc = cls(d_model, d_tc, layer, "jumprelu" if thr is not None else "relu", "W_skip" in tensors, dtype=dtype)
        with torch.no_grad():
            tc.W_enc.copy_(tensors["W_enc"].T)
            tc.W_dec.copy_(tensors["W_dec"])
            tc.b_enc.copy_(tensors["b_enc"])
            tc.b_dec.copy_(tensors["b_dec"])
            if tc.W_skip is not None:
                tc.W_skip.copy_(tensors["W_skip"])
            if tc.threshold is not None:
                tc.threshold.copy_(thr)
        return tc


class TranscoderSet(nn.Module):
    """One transcoder per block, all of one width, reading ``blocks.l.mlp.hook_in`` and writing
    ``blocks.l.mlp.hook_out``; ``scan`` names the set (circuit-tracer's identifier, kept in graph JSON)."""

    def __init__(self, transcoders: Mapping[int, Transcoder] | list[Transcoder], scan: str = "trace-transcoders",
                 feature_input_hook: str = INPUT_HOOKS[0], feature_output_hook: str = OUTPUT_HOOKS[0]) -> None:
        super().__init__()
        by_layer = dict(enumerate(transcoders)) if isinstance(transcoders, list) else dict(transcoders)
        if not by_layer:
            raise TranscoderError("an empty transcoder set: give one transcoder per block")
        want = set(range(max(by_layer) + 1))
        if set(by_layer) != want:
            raise TranscoderError(f"transcoders cover layers {sorted(by_layer)} but a set needs every layer from 0: "
                                  f"missing {sorted(want - set(by_layer))}")
        if feature_input_hook not in INPUT_HOOKS:
            raise TranscoderError(f"transcoders reading {feature_input_hook!r} are not supported: trace's transcoders "
                                  f"read the MLP input ({' or '.join(INPUT_HOOKS)})")
        if feature_output_hook not in OUTPUT_HOOKS:
            raise TranscoderError(f"transcoders writing {feature_output_hook!r} are not supported: trace's "
                                  f"transcoders predict the MLP output ({' or '.join(OUTPUT_HOOKS)})")
        self.layers = nn.ModuleList([by_layer[i] for i in range(len(by_layer))])
        for i, tc in enumerate(self.layers):
            tc.layer = i
        widths = {tc.d_transcoder for tc in self.layers}
        models = {tc.d_model for tc in self.layers}
        if len(widths) > 1 or len(models) > 1:
            raise TranscoderError(f"transcoders of one set must share their shape; got d_transcoder {sorted(widths)} "
                                  f"and d_model {sorted(models)}")
        if len({tc.has_skip for tc in self.layers}) > 1:
            raise TranscoderError("either every transcoder of a set has a skip connection (W_skip) or none has")
        self.scan = scan
        self.feature_input_hook, self.feature_output_hook = feature_input_hook, feature_output_hook
        self.info: dict = {}  # how the set was made (the trainer's per-layer fit); not saved

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, layer: int) -> Transcoder:
        return self.layers[layer]

    def __iter__(self) -> Iterator[Transcoder]:
        return iter(self.layers)

    @property
    def d_model(self) -> int:
        return self.layers[0].d_model

    @property
    def d_transcoder(self) -> int:
        return self.layers[0].d_transcoder

    @property
    def has_skip(self) -> bool:
        return self.layers[0].has_skip

    def check_fits(self, loaded) -> None:
        """TranscoderError unless there is one transcoder per block of ``loaded`` and each reads its width."""
        n = loaded.n_layers
        if len(self) != n:
            have = f"layers 0..{len(self) - 1}"
            what = f"missing layers {len(self)}..{n - 1}" if len(self) < n else f"{len(self) - n} layers too many"
            raise TranscoderError(f"the transcoder set covers {have} but {loaded.name} has {n} blocks ({what}): "
                                  "train or load transcoders for every block of this model")
        if self.d_model != loaded.d_model:
            raise TranscoderError(f"the transcoders read width d_model={self.d_model} but {loaded.name}'s residual "
                                  f"stream has width {loaded.d_model}: they were made for another model")

    def save(self, folder: str | Path) -> Path:
        """Write the set in circuit-tracer's ``transcoder_set`` layout (module docstring), atomically."""
        folder = Path(folder)
        if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            raise TranscoderError(f"cannot save transcoders to {folder}: it exists and is not empty")
        cfg = {"model_kind": "transcoder_set", "feature_input_hook": self.feature_input_hook,
               "feature_output_hook": self.feature_output_hook, "scan": self.scan}

        def write(tmp: Path) -> None:
            for i, tc in enumerate(self.layers):
                write_layer_file(tc, tmp / layer_file(i))
            (tmp / CONFIG_FILE).write_text(config_text(cfg), encoding="utf-8")

        if folder.exists():
            folder.rmdir()
        atomic_dir(folder, write)
        return folder


def layer_file(layer: int) -> str:
    """The file name of layer ``layer``'s transcoder in circuit-tracer's layout."""
    return f"layer_{layer}.safetensors"


def write_layer_file(tc: Transcoder, path: Path) -> None:
    """Write one transcoder's tensors (circuit-tracer's layout, :meth:`Transcoder.state`) to ``path``; refuses
    NaN/Inf. Not atomic by itself: callers write into a temporary (``atomic_dir`` / ``atomic_write``)."""
    tensors = tc.state()
    for k, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise TranscoderError(f"refusing to save transcoders: layer {tc.layer}'s {k} holds NaN/Inf")
    save_file({k: t.cpu() for k, t in tensors.items()}, str(path))


def config_text(cfg: Mapping[str, str]) -> str:
    """``config.yaml`` as flat ``key: "string"`` lines: valid YAML (a JSON string is a YAML double-quoted
    scalar) that :func:`load_transcoder_set` reads without PyYAML."""
    return "".join(f"{k}: {json.dumps(v)}\n" for k, v in cfg.items())


def set_config(scan: str) -> dict[str, str]:
    """The ``config.yaml`` mapping of a trace transcoder set named ``scan``."""
    return {"model_kind": "transcoder_set", "feature_input_hook": INPUT_HOOKS[0],
            "feature_output_hook": OUTPUT_HOOKS[0], "scan": scan}


def _read_flat(path: Path, text: str) -> dict:
    """The flat ``key: value`` form trace writes, read without PyYAML (values are JSON scalars or bare words)."""
    out: dict = {}
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, value = line.partition(":")
        if not sep or line.startswith((" ", "-")):
            raise TranscoderError(f"{path}: cannot read line {line!r} without PyYAML (pip install pyyaml)")
        value = value.strip()
        try:
            out[key.strip()] = json.loads(value) if value else None
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def _read_config(path: Path) -> dict:
    text = path.read_text(encoding="utf-8")
    try:
        import yaml
    except ImportError:  # PyYAML is optional (trace's own config files are flat)
        yaml = None
    if yaml is None:
        return _read_flat(path, text)
    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise TranscoderError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(cfg, dict):
        raise TranscoderError(f"{path} does not hold a mapping")
    return cfg


def load_transcoder_set(folder: str | Path, device: str | torch.device = "cpu") -> TranscoderSet:
    """Read a circuit-tracer ``transcoder_set`` folder (``config.yaml`` + ``layer_{i}.safetensors``, or the files
    the config's ``transcoders`` list names, relative to the folder)."""
    folder = Path(folder)
    cfg_path = folder / CONFIG_FILE
    if not cfg_path.is_file():
        raise TranscoderError(f"{folder} has no {CONFIG_FILE}, so it is not a circuit-tracer transcoder set")
    cfg = _read_config(cfg_path)
    if cfg.get("model_kind") != "transcoder_set":
        raise TranscoderError(f"{cfg_path}: model_kind is {cfg.get('model_kind')!r}; trace reads per-layer "
                              "transcoders (model_kind: transcoder_set), not cross-layer transcoders")
    if "transcoders" in cfg:
        paths = {i: (folder / p) for i, p in enumerate(cfg["transcoders"] or [])}
    else:
        paths = {}
        for p in folder.glob("layer_*.safetensors"):
            stem = p.stem.split("_", 1)[1]
            if stem.isdigit():
                paths[int(stem)] = p
    if not paths:
        raise TranscoderError(f"{folder} holds no layer_<i>.safetensors files")
    tcs = {}
    for i, p in sorted(paths.items()):
        if not p.is_file():
            raise TranscoderError(f"transcoder file {p} (layer {i}) does not exist")
        with safe_open(str(p), framework="pt", device=str(device)) as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if "log_thresholds" in tensors:
            raise TranscoderError(f"{p} holds log_thresholds; circuit-tracer's layout stores "
                                  "activation_function.threshold")
        tcs[i] = Transcoder.from_state(tensors, i, where=str(p))
    return TranscoderSet(tcs, scan=str(cfg.get("scan") or folder.name),
                         feature_input_hook=cfg.get("feature_input_hook", INPUT_HOOKS[0]),
                         feature_output_hook=cfg.get("feature_output_hook", OUTPUT_HOOKS[0]))
