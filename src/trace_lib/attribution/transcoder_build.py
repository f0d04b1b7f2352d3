"""``trace graph build``: per-layer transcoders for a real model, trained from a stream, one layer per pass.

:func:`~trace_lib.attribution.transcoder_train.train_transcoders` holds every layer's (MLP input, MLP output)
pairs in memory, which a 30-layer model with d_model 576 and millions of tokens does not allow. Here each
layer is trained on its own pass over the SAE data plan (:class:`~trace_lib.sae.plan.SAEDataPlan`: the broad
corpus's train split plus chat-formatted prompts): forward passes on token batches, stopped at block l's MLP,
yield the pairs ``[x | y]`` of every real token but position 0, which go through the SAE trainer's seeded
mixing buffer (:class:`~trace_lib.sae.training.data.ActivationData`, ``shuffle_buffer_tokens`` rows) into
``steps = tokens // batch_size`` Adam steps of the transcoder loss (:func:`fit_transcoder`; the corpus is
cycled when ``tokens`` exceed it). Memory is bounded by the buffer and one forward batch, not by ``tokens``.

Per layer, after training, the transcoder is written (atomically) as ``layer_{l}.safetensors`` in
circuit-tracer's ``transcoder_set`` layout, read back from that file and measured on the plan's HELD-OUT split
(documents no training chunk shares), streaming and in float64 sums over all held-out tokens but position 0::

    nmse = sum ||y - y^||^2 / sum ||y - mean(y)||^2     (normalised MSE of the MLP output; 1 = predicting the mean)
    l0   = mean number of active features per token
    dead_fraction = share of features active on no held-out token

``MANIFEST.json`` is rewritten after every layer (``complete`` false until every block has a file): model,
model hash, config, data, per-layer quality and sha256 of every file. A run resumes by skipping the layers
whose file is in the manifest with its sha256; the same config, data and seed give bit-identical files
(CPU), whether or not the run was interrupted in between. Default folder:
``$TRACE_CACHE/transcoders/<model hash>/<config key>/``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trace_lib.attribution.transcoder import (
    ACTIVATIONS,
    CONFIG_FILE,
    TranscoderSet,
    config_text,
    layer_file,
    load_transcoder_set,
    set_config,
    write_layer_file,
)
from trace_lib.attribution.transcoder_train import SPARSITY, fit_transcoder, fold_scales, init_transcoder
from trace_lib.cache import (
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    cache_root,
    check_manifest_files,
    file_sha256,
    stable_hash,
)
from trace_lib.capture.buffer import token_key
from trace_lib.capture.registry import register_hook
from trace_lib.errors import TranscoderError
from trace_lib.progress import track
from trace_lib.sae.training.config import SAETrainingConfig
from trace_lib.sae.training.data import ActivationData
from trace_lib.validate import POSITIVE, POSITIVE_INT, check_choice

MANIFEST = "MANIFEST.json"
BUILD_FORMAT = "trace-transcoder-set"
BUILD_VERSION = 1

Batches = Sequence[dict[str, torch.Tensor]]


@dataclass(frozen=True)
class TranscoderBuildConfig:
    """How each layer's transcoder is trained (width None: 4 x d_model). ``tokens`` training tokens per layer,
    in batches of ``batch_size``; the loss, schedule and penalty are :func:`fit_transcoder`'s."""

    width: int | None = None
    tokens: int = 2_000_000
    batch_size: int = 1024
    lr: float = 1e-3
    activation: str = "relu"
    skip: bool = True
    sparsity: str = "tanh"
    sparsity_coefficient: float = 1.0
    tanh_scale: float = 1.0
    seed: int = 0
    shuffle_buffer_tokens: int = 32768
    init_tokens: int = 8192

    def check(self) -> None:
        check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("sparsity", self.sparsity, SPARSITY)
        if self.sparsity == "l0" and self.activation != "jumprelu":
            raise TranscoderError("the l0 penalty trains JumpReLU thresholds: use activation='jumprelu'")
        for name in ("tokens", "batch_size", "shuffle_buffer_tokens", "init_tokens", "width"):
            POSITIVE_INT.check(name, getattr(self, name))
        for name in ("lr", "tanh_scale"):
            POSITIVE.check(name, getattr(self, name))
        if self.tokens < self.batch_size:
            raise TranscoderError(f"tokens ({self.tokens}) must be at least one batch ({self.batch_size})")
        if not self.sparsity_coefficient >= 0:
            raise TranscoderError(f"sparsity_coefficient must be >= 0, not {self.sparsity_coefficient}")

    @property
    def steps(self) -> int:
        return self.tokens // self.batch_size


@dataclass(frozen=True)
class TranscoderBuild:
    """A built (possibly partial) transcoder folder and its manifest."""

    folder: Path
    manifest: dict[str, Any]

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    @property
    def layers(self) -> list[int]:
        return sorted(int(k) for k in self.manifest.get("layers", {}))

    @property
    def build_command(self) -> str:
        return str(self.manifest.get("build_command") or "trace graph build")

    def verify(self) -> None:
        """TranscoderError unless every file the manifest lists is present with its sha256."""
        check_manifest_files(self.folder, self.manifest.get("files", {}), "transcoder file",
                             f"rebuild with `{self.build_command}`", TranscoderError)

    def load(self, device: str | torch.device = "cpu") -> TranscoderSet:
        self.verify()
        return load_transcoder_set(self.folder, device=device)


def model_hash(loaded) -> str:
    """The hash a transcoder set is keyed by: the weights' own (any device or dtype), as for SAE packs."""
    return getattr(loaded, "weights_hash", "") or loaded.content_hash


def read_build(folder: str | Path) -> TranscoderBuild | None:
    """The build manifest in ``folder``, or None when there is none (a plain circuit-tracer folder)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TranscoderError(f"cannot read {path}: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUILD_FORMAT:
        raise TranscoderError(f"{path} is not a trace transcoder manifest")
    return TranscoderBuild(Path(folder), manifest)


def built_transcoders(loaded) -> TranscoderBuild | None:
    """The newest complete build for ``loaded`` under ``$TRACE_CACHE/transcoders/<model hash>/``, or None."""
    root = cache_root() / "transcoders" / model_hash(loaded)
    if not root.is_dir():
        return None
    found = [b for p in root.iterdir() if (b := read_build(p)) is not None and b.complete]
    return max(found, key=lambda b: (b.folder / MANIFEST).stat().st_mtime) if found else None


class _Stop(Exception):
    """Raised by the capture hook: the forward pass ends at the layer being trained."""


def layer_pairs(loaded, layer: int, batches: Batches, skip_first: bool = True) -> Iterator[torch.Tensor]:
    """``[x | y]`` [n_tokens, 2 d_model] float32 CPU per batch: block ``layer``'s MLP input and output on every
    real token (position 0 left out), each forward pass stopped right after that MLP."""
    dev = loaded.arch.embed.weight.device
    seen: dict[str, torch.Tensor] = {}

    def hook(module, args, output):
        seen["x"], seen["y"] = args[0], output
        raise _Stop

    for b in batches:
        handle = register_hook(loaded.arch.layers[layer].mlp, hook, hook_name=f"blocks.{layer}.mlp",
                               kind="capture", owner="build_transcoders")
        try:
            with torch.no_grad():
                loaded.model(**{k: v.to(dev) for k, v in b.items()}, use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
        mask = b["attention_mask"].bool().clone()
        if skip_first:
            mask[:, 0] = False
        mask = mask.to(dev)
        yield torch.cat([seen["x"][mask], seen["y"][mask]], dim=-1).float().cpu()


@torch.no_grad()
def heldout_quality(loaded, tc, batches: Batches) -> dict[str, float]:
    """``nmse``, ``l0``, ``dead_fraction`` and ``tokens`` of transcoder ``tc`` on ``batches`` (module docstring)."""
    d = loaded.d_model
    n, err, l0 = 0, 0.0, 0.0
    y_sum = torch.zeros(d, dtype=torch.float64)
    yy = 0.0
    fired = torch.zeros(tc.d_transcoder, dtype=torch.bool)
    for xy in layer_pairs(loaded, tc.layer, batches):
        x, y = xy[:, :d], xy[:, d:]
        a = tc.encode(x)
        err += float((tc.decode(a, x) - y).double().pow(2).sum())
        y_sum += y.double().sum(0)
        yy += float(y.double().pow(2).sum())
        l0 += float((a != 0).sum())
        fired |= (a != 0).any(0)
        n += len(x)
    if n == 0:
        raise TranscoderError("the held-out batches hold no tokens to measure the transcoders on")
    var = yy - float(y_sum.pow(2).sum()) / n
    return {"nmse": err / var if var > 0 else float("nan"), "l0": l0 / n,
            "dead_fraction": 1.0 - float(fired.float().mean()), "tokens": n}


def _train_one(loaded, layer: int, cfg: TranscoderBuildConfig, width: int, train: Batches, device: torch.device):
    d = loaded.d_model
    data_cfg = SAETrainingConfig(batch_size=cfg.batch_size, seed=cfg.seed * 1_000 + layer, device="cpu",
                                 shuffle_buffer_tokens=cfg.shuffle_buffer_tokens, init_tokens=cfg.init_tokens)
    data = ActivationData(lambda: layer_pairs(loaded, layer, train), data_cfg)
    sample = data.sample_source
    s_in = math.sqrt(d) / float(sample[:, :d].double().norm(dim=1).mean())
    s_out = math.sqrt(d) / float(sample[:, d:].double().norm(dim=1).mean())
    tc, log_thr = init_transcoder(d, width, layer, cfg.activation, cfg.skip, cfg.seed,
                                  (sample[:, d:] * s_out).mean(0), device)
    stream = data.batches(None)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for b in track(stream, f"layer {layer}: training transcoder", total=cfg.steps):
            b = b.to(device)
            yield b[:, :d] * s_in, b[:, d:] * s_out

    it = batches()
    try:
        fit_transcoder(tc, log_thr, it, cfg.steps, sparsity=cfg.sparsity, coefficient=cfg.sparsity_coefficient,
                       tanh_scale=cfg.tanh_scale, lr=cfg.lr)
    finally:
        it.close()
        stream.close()
    return fold_scales(tc, log_thr, s_in, s_out)


def _plan_data(loaded, plan) -> tuple[list, list, dict]:
    from trace_lib.sae.plan import SAEDataPlan, plan_batches

    plan = plan or SAEDataPlan()
    if plan.corpus != "broad":
        raise TranscoderError("transcoders are measured on the broad corpus's held-out split: use corpus='broad'")
    if loaded.tokenizer is None:
        raise TranscoderError(f"{loaded.name} has no tokenizer: give train_ids and heldout_ids [n, seq_len]")
    data = plan_batches(loaded, plan)
    return data.train, data.heldout, {"plan": plan.to_dict(), "corpus": data.corpus}


def _id_batches(ids: torch.Tensor, size: int = 16) -> list[dict[str, torch.Tensor]]:
    from trace_lib.capture.inputs import chunk_batches

    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise TranscoderError("train_ids and heldout_ids must be integer tensors [n_sequences, seq_len]")
    return list(chunk_batches(ids.long(), size))


def build_transcoders(loaded, out: str | Path | None = None, *, layers: Sequence[int] | None = None,
                      config: TranscoderBuildConfig | None = None, plan=None,
                      train_ids: torch.Tensor | None = None, heldout_ids: torch.Tensor | None = None,
                      build_command: str = "", log: Callable[[str], None] = lambda s: None) -> TranscoderBuild:
    """Train (or resume) ``loaded``'s per-layer transcoders for ``layers`` (default all) into ``out`` (default
    the cache folder of this model and config) and return the build (module docstring).

    Data: the SAE data plan ``plan`` (default :class:`~trace_lib.sae.plan.SAEDataPlan`), or token ids
    ``train_ids`` and ``heldout_ids`` [n, seq_len] (both; for models without a tokenizer and for tests)."""
    cfg = config or TranscoderBuildConfig()
    width = cfg.width or 4 * loaded.d_model
    cfg = dataclasses.replace(cfg, width=width)
    cfg.check()
    n_layers = loaded.n_layers
    todo_layers = sorted(set(range(n_layers) if layers is None else layers))
    bad = [i for i in todo_layers if not 0 <= i < n_layers]
    if bad or not todo_layers:
        raise TranscoderError(f"layers {bad or '(none)'} are not blocks of {loaded.name} (0..{n_layers - 1})")
    if (train_ids is None) != (heldout_ids is None):
        raise TranscoderError("give both train_ids and heldout_ids, or neither (the SAE data plan)")
    if train_ids is not None:
        train, heldout = _id_batches(train_ids), _id_batches(heldout_ids)
        data_info: dict[str, Any] = {"source": "token ids"}
    else:
        train, heldout, data_info = _plan_data(loaded, plan)
    data_info = {**data_info, "train_tokens_key": token_key(train), "heldout_tokens_key": token_key(heldout)}
    mhash = model_hash(loaded)
    key = stable_hash({"config": dataclasses.asdict(cfg), "data": data_info, "model": mhash})
    folder = Path(out) if out is not None else cache_root() / "transcoders" / mhash / key
    scan = f"trace-{loaded.name}-{mhash[:8]}-w{width}"
    base = {"format": BUILD_FORMAT, "version": BUILD_VERSION, "model": loaded.name, "model_hash": mhash,
            "n_layers": n_layers, "d_model": loaded.d_model, "key": key, "scan": scan,
            "config": dataclasses.asdict(cfg), "steps": cfg.steps, "data": data_info,
            "quality_measured_on": "held-out tokens (position 0 left out), float32 weights as written",
            "build_command": build_command or "trace graph build"}
    old = read_build(folder)
    if old is not None and old.manifest.get("key") != key:
        raise TranscoderError(f"{folder} holds transcoders built for another model, config or data (key "
                              f"{old.manifest.get('key')}, this run {key}); choose another --out")
    if old is None and folder.exists() and any(folder.iterdir()):
        raise TranscoderError(f"cannot build transcoders in {folder}: it exists, is not empty and has no {MANIFEST}")
    done: dict[str, dict] = dict(old.manifest.get("layers", {})) if old else {}
    for k, rec in list(done.items()):  # a layer counts as done only if its file is intact
        path = folder / rec["file"]
        if not path.is_file() or file_sha256(path) != rec["sha256"]:
            done.pop(k)
    device = loaded.arch.embed.weight.device
    todo = [i for i in todo_layers if str(i) not in done]
    log(f"{len(todo_layers) - len(todo)} of {len(todo_layers)} layers already built in {folder}; "
        f"training {len(todo)} ({cfg.steps} steps of {cfg.batch_size} tokens each)")
    for layer in todo:
        t0 = time.perf_counter()
        torch.manual_seed(cfg.seed)
        tc = _train_one(loaded, layer, cfg, width, train, device)
        path = folder / layer_file(layer)
        atomic_write(path, lambda p, tc=tc: write_layer_file(tc, p))
        written = load_transcoder_set_layer(path, layer)
        quality = heldout_quality(loaded, written.to(device), heldout)
        done[str(layer)] = {"file": path.name, "sha256": file_sha256(path), **quality,
                            "train_tokens": cfg.steps * cfg.batch_size,
                            "seconds": round(time.perf_counter() - t0, 2)}
        log(f"layer {layer}: held-out nmse {quality['nmse']:.3f}, L0 {quality['l0']:.1f}, "
            f"dead {quality['dead_fraction']:.3f}")
        _write_manifest(folder, base, done, n_layers)
    return _write_manifest(folder, base, done, n_layers)


def load_transcoder_set_layer(path: Path, layer: int):
    """One transcoder read back from its file (float32, CPU)."""
    from safetensors.torch import load_file

    from trace_lib.attribution.transcoder import Transcoder

    return Transcoder.from_state(load_file(str(path)), layer, where=str(path))


def _write_manifest(folder: Path, base: dict, done: dict[str, dict], n_layers: int) -> TranscoderBuild:
    atomic_write_text(folder / CONFIG_FILE, config_text(set_config(base["scan"])))
    files = {CONFIG_FILE: file_sha256(folder / CONFIG_FILE)}
    files.update({rec["file"]: rec["sha256"] for _, rec in sorted(done.items(), key=lambda kv: int(kv[0]))})
    layers = {k: done[k] for k in sorted(done, key=int)}
    manifest = {**base, "complete": len(done) == n_layers, "layers": layers, "files": files}
    atomic_write_json(folder / MANIFEST, manifest)
    return TranscoderBuild(folder, manifest)
