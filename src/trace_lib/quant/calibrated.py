"""GPTQ and AWQ: calibrated 4-bit weight quantization with llmcompressor (vLLM's LLM Compressor).

Both run llmcompressor's own algorithms on CPU, on a calibration set of packed English text
(:func:`trace_lib.datasets.corpus.english_corpus`, Python's own docstrings, no download):

- ``int4-gptq-g{G}``: ``GPTQModifier`` (block size 128, dampening 0.01, ``actorder="static"``), int4 symmetric,
  one scale per group of G input channels. Weights are rounded column by column while the not yet rounded
  columns absorb the error, so each layer's output on the calibration inputs stays close to the reference's.
- ``int4-awq-g{G}``: ``AWQModifier(duo_scaling=True)`` then ``QuantizationModifier``, int4 asymmetric (a scale
  and a zero point per group). AWQ searches per-channel scales that protect the inputs with large
  activations; it folds them into the preceding norm or Linear, so those change too.

llmcompressor works on its own copy of the model (it attaches observers, hooks and ``weight_scale`` /
``weight_zero_point`` parameters). Afterwards each quantized weight is de-quantized with compressed-tensors'
``fake_quantize`` and given, with every other tensor the algorithm changed (AWQ's rescaled norms), to the
variant as new plain float parameters (the tensors it left unchanged stay shared with the reference): the
variant keeps the reference's module structure and runs at reference speed, with exactly the numerics of the
int4 checkpoint llmcompressor would save. That working copy is a full copy of the weights while it lives.

Calibration settings come from ``config.calibration`` (see :data:`CALIBRATION_DEFAULTS`); they, the
library versions and a sha256 of the calibration tokens are recorded in ``quant_info["calibration"]``.
On SmolLM2-135M (30 layers, group 32 or 64; its width 576 is not a multiple of 128) with the default 16 x 256
tokens, GPTQ takes about 4 minutes and AWQ about 16 on a CPU.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import io
import logging
import os
import tempfile
from collections.abc import Iterator

import torch
from torch import nn

from trace_lib.errors import QuantizationError
from trace_lib.quant.config import QuantizationConfig, QuantizationType
from trace_lib.quant.linears import check_group_size

#: What to install (into the project's environment) to enable ``int4-gptq`` / ``int4-awq``.
INSTALL_LINES = (
    "pip install --no-deps llmcompressor==0.14.0.1 compressed-tensors==0.19.0",
    "pip install -c constraints.txt loguru datasets pydantic psutil nvidia-ml-py pyyaml requests pillow tqdm",
)
INSTALL_HINT = "; then ".join(INSTALL_LINES)

#: ``config.calibration`` keys and their defaults. ``n_samples`` sequences of ``seq_len`` tokens of the
#: English corpus shuffled with ``seed``; the GPTQ and AWQ knobs are llmcompressor's.
CALIBRATION_DEFAULTS: dict = {"n_samples": 16, "seq_len": 256, "seed": 0,
                              "block_size": 128, "dampening_frac": 0.01,  # GPTQ
                              "duo_scaling": True, "n_grid": 20}  # AWQ
_GPTQ_ONLY = ("block_size", "dampening_frac")
_AWQ_ONLY = ("duo_scaling", "n_grid")

# Parameters llmcompressor / compressed-tensors add to a quantized module; never copied into the variant.
_QUANT_SUFFIXES = ("weight_scale", "weight_zero_point", "weight_g_idx", "weight_global_scale",
                   "input_scale", "input_zero_point", "input_global_scale", "output_scale", "output_zero_point")


def _require_llmcompressor(config: QuantizationConfig):
    # On import llmcompressor replaces every loguru handler with one that prints to stdout, unless its logging
    # is disabled: keep stdout for trace's own output (set LLM_COMPRESSOR_LOG_DISABLED=false to see its log).
    os.environ.setdefault("LLM_COMPRESSOR_LOG_DISABLED", "true")
    try:
        import compressed_tensors
        import llmcompressor
    except ImportError as e:
        raise QuantizationError(
            f"{config.name} needs llmcompressor (GPTQ/AWQ calibration on CPU), which is not installed "
            f"({e}); install it with: {INSTALL_HINT}") from e
    from loguru import logger

    try:  # with its logging disabled llmcompressor skips registering the level it then logs timings at
        logger.level("METRIC")
    except ValueError:
        logger.level("METRIC", no=38)
    return llmcompressor, compressed_tensors


def calibration_settings(config: QuantizationConfig) -> dict:
    """``config.calibration`` merged over :data:`CALIBRATION_DEFAULTS`, validated; only the keys that apply."""
    given = dict(config.calibration or {})
    unknown = sorted(set(given) - set(CALIBRATION_DEFAULTS))
    if unknown:
        raise QuantizationError(f"{config.name}: unknown calibration option(s) {unknown}; "
                                f"valid: {sorted(CALIBRATION_DEFAULTS)}")
    s = {**CALIBRATION_DEFAULTS, **given}
    for key in ("n_samples", "seq_len", "block_size", "n_grid"):
        if isinstance(s[key], bool) or not isinstance(s[key], int) or s[key] < 1:
            raise QuantizationError(f"{config.name}: calibration {key} must be a positive integer, not {s[key]!r}")
    if s["seq_len"] < 2:
        raise QuantizationError(f"{config.name}: calibration seq_len must be at least 2, not {s['seq_len']}")
    if isinstance(s["seed"], bool) or not isinstance(s["seed"], int):
        raise QuantizationError(f"{config.name}: calibration seed must be an integer, not {s['seed']!r}")
    if not isinstance(s["dampening_frac"], (int, float)) or not 0 < s["dampening_frac"] < 1:
        raise QuantizationError(f"{config.name}: dampening_frac must lie in (0, 1), not {s['dampening_frac']!r}")
    s["dampening_frac"] = float(s["dampening_frac"])
    if s["duo_scaling"] not in (True, False, "both"):
        raise QuantizationError(f"{config.name}: duo_scaling must be True, False or 'both', not {s['duo_scaling']!r}")
    drop = _AWQ_ONLY if config.type is QuantizationType.INT4_GPTQ else _GPTQ_ONLY
    return {k: v for k, v in s.items() if k not in drop}


def calibration_tokens(tokenizer, n_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """[n, seq_len] token ids: the English corpus (without optional system texts) shuffled with ``seed``,
    packed into full-length chunks (:func:`~trace_lib.capture.inputs.pack_texts`); n <= ``n_samples``."""
    from trace_lib.capture.inputs import pack_texts
    from trace_lib.datasets.corpus import english_corpus

    texts = english_corpus(seed=seed, include_system_texts=False)
    return pack_texts(tokenizer, texts, seq_len, max_sequences=n_samples)


def _recipe(config: QuantizationConfig, settings: dict, ignore: list[str]):
    symmetric = config.type is QuantizationType.INT4_GPTQ
    groups = {"group_0": {"targets": ["Linear"],
                          "weights": {"num_bits": config.bits, "type": "int", "strategy": "group",
                                      "group_size": config.group_size, "symmetric": symmetric}}}
    if config.type is QuantizationType.INT4_GPTQ:
        from llmcompressor.modifiers.quantization import GPTQModifier

        return GPTQModifier(config_groups=groups, ignore=ignore, block_size=settings["block_size"],
                            dampening_frac=settings["dampening_frac"])
    from llmcompressor.modifiers.quantization import QuantizationModifier

    return [_counting_awq()(duo_scaling=settings["duo_scaling"], n_grid=settings["n_grid"]),
            QuantizationModifier(config_groups=groups, ignore=ignore)]


_AWQ_RESOLVED: list[int] = []  # how many smoothing mappings each AWQ run resolved (read after the run)


@functools.cache
def _counting_awq():
    """``AWQModifier`` that records how many (norm or Linear -> Linears) smoothing mappings it resolved.

    For architectures llmcompressor has no AWQ mappings for (GPT-2's ``ln_1``/``c_attn``) its default,
    Llama-style patterns match nothing and AWQ silently smooths nothing; trace refuses that variant.
    """
    from llmcompressor.modifiers.transform.awq import AWQModifier

    class CountingAWQModifier(AWQModifier):
        def _set_resolved_mappings(self, model) -> None:
            super()._set_resolved_mappings(model)
            _AWQ_RESOLVED.append(len(self._resolved_mappings))

    return CountingAWQModifier


@contextlib.contextmanager
def _cpu_pin_memory_patch(active: bool) -> Iterator[None]:
    """AWQ pins cached intermediates for faster host-to-device copies; pinning needs an accelerator.

    With none, ``IntermediatesCache.pin_memory`` is made a no-op for the duration of the call (values stay
    where they are; nothing else changes) and restored afterwards.
    """
    if not active:
        yield
        return
    from llmcompressor.pipelines.cache import IntermediatesCache

    original = IntermediatesCache.__dict__["pin_memory"]
    IntermediatesCache.pin_memory = lambda self, *a, **k: None
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = original


@contextlib.contextmanager
def _quiet_library() -> Iterator[None]:
    """Silence compressed-tensors' loguru messages and torch.fx's tracing notice; when trace's progress bars
    are off (``TRACE_QUIET=1`` or no terminal) also llmcompressor's tqdm bars, which write to ``sys.stderr``
    (set aside for the call). llmcompressor's own log is off unless ``LLM_COMPRESSOR_LOG_DISABLED=false``."""
    from loguru import logger

    from trace_lib.progress import enabled

    wants_log = os.environ.get("LLM_COMPRESSOR_LOG_DISABLED", "").lower() == "false"
    fx_log = logging.getLogger("torch.fx._symbolic_trace")
    fx_level = fx_log.level
    fx_log.setLevel(logging.ERROR)
    if not wants_log:
        logger.disable("compressed_tensors")
    try:
        with contextlib.ExitStack() as stack:
            if not wants_log and not enabled():
                stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
            yield
    finally:
        fx_log.setLevel(fx_level)
        if not wants_log:
            logger.enable("compressed_tensors")


def _untie(module: nn.Linear, shared: set[int]) -> None:
    """Give a Linear whose weight is shared (tied embeddings) its own copy, so quantizing it changes only it."""
    if id(module.weight) in shared:
        module.weight = nn.Parameter(module.weight.detach().clone(), requires_grad=False)


def _dequantized(module: nn.Module) -> torch.Tensor:
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    scheme = getattr(module, "quantization_scheme", None)
    if scheme is None or scheme.weights is None or not hasattr(module, "weight_scale"):
        raise QuantizationError(f"llmcompressor left {type(module).__name__} without int4 weight parameters")
    zero = getattr(module, "weight_zero_point", None)
    with torch.no_grad():
        return fake_quantize(module.weight, module.weight_scale, zero, scheme.weights)


def _take_changed(model: nn.Module, work_state: dict[str, torch.Tensor], skip: set[str],
                  config: QuantizationConfig) -> None:
    """Rebind each tensor of ``model`` (but ``skip``) whose value in ``work_state`` differs to a new tensor of
    that value; equal ones are left alone. Never writes in place: ``model``'s tensors may share storage with the
    reference (:func:`trace_lib.quant.apply.shared_copy`). Tied tensors stay tied."""
    modules = dict(model.named_modules())
    changed: dict[int, tuple[torch.Tensor, torch.Tensor, list[str]]] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        if key in skip:
            continue
        if key not in work_state:
            raise QuantizationError(f"llmcompressor's model has no tensor {key}; cannot build {config.name}")
        src = work_state[key]
        if src.shape != t.shape:
            raise QuantizationError(f"llmcompressor changed the shape of {key}; cannot build {config.name}")
        src = src.detach().to(device=t.device, dtype=t.dtype)
        if id(t) in changed or not torch.equal(src, t):
            changed.setdefault(id(t), (t, src, []))[2].append(key)
    for t, src, keys in changed.values():
        new = nn.Parameter(src, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else src
        for key in keys:
            owner, _, attr = key.rpartition(".")
            if isinstance(t, nn.Parameter):
                setattr(modules[owner], attr, new)
            else:
                modules[owner]._buffers[attr] = new


def apply_calibrated(model: nn.Module, config: QuantizationConfig, linears: list[tuple[str, nn.Linear]],
                     reference, qparams: dict | None = None) -> dict:
    """Quantize ``linears`` of ``model`` (the variant's copy) with GPTQ or AWQ; return the info dict.

    ``reference`` is the reference :class:`~trace_lib.models.load.Loaded`; its tokenizer encodes the
    calibration text. ``model`` ends as a plain float model with its module structure unchanged: quantized
    Linears hold their de-quantized int4 weights, and every other tensor AWQ rescales is updated. If a dict
    is given as ``qparams`` it receives, for each quantized Linear's name, llmcompressor's
    ``(weight_scale, weight_zero_point)`` ([out, in/G] each): ``W = (q - zero) * scale``, ``q`` in [-8, 7].
    """
    if config.type not in (QuantizationType.INT4_GPTQ, QuantizationType.INT4_AWQ):
        raise QuantizationError(f"{config.name} is not a GPTQ/AWQ type")
    check_group_size(linears, config.group_size, config.name)
    settings = calibration_settings(config)
    tokenizer = getattr(reference, "tokenizer", None)
    if tokenizer is None:
        raise QuantizationError(f"{config.name}: GPTQ/AWQ calibration encodes text and needs the model's "
                                "tokenizer; load the model from a folder or GGUF file that has one")
    llmcompressor, compressed_tensors = _require_llmcompressor(config)
    from llmcompressor import oneshot
    from llmcompressor.core import reset_session

    ids = calibration_tokens(tokenizer, settings["n_samples"], settings["seq_len"], settings["seed"])
    token_hash = hashlib.sha256(ids.numpy().astype("<i8").tobytes()).hexdigest()

    # llmcompressor's working copy: hooks, observers and quantization parameters stay on it.
    work = copy.deepcopy(model)
    work.eval()
    selected = {n for n, _ in linears}
    work_modules = dict(work.named_modules())
    all_linears = [n for n, m in work_modules.items() if isinstance(m, nn.Linear)]
    ignore = sorted(n for n in all_linears if n not in selected)
    counts: dict[int, int] = {}
    for p in work_modules[""].state_dict(keep_vars=True).values():
        counts[id(p)] = counts.get(id(p), 0) + 1
    shared = {i for i, c in counts.items() if c > 1}
    for n in selected:
        _untie(work_modules[n], shared)

    from datasets import Dataset

    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    no_accelerator = not torch.accelerator.is_available()
    patched = config.type is QuantizationType.INT4_AWQ and no_accelerator
    _AWQ_RESOLVED.clear()
    with tempfile.TemporaryDirectory(prefix="trace-calib-") as tmp:
        # oneshot re-reads the model's config from config.name_or_path: give it one on disk.
        work.config.save_pretrained(tmp)
        work.config._name_or_path = tmp
        with _quiet_library():
            try:
                with _cpu_pin_memory_patch(patched), torch.random.fork_rng(devices=[]):
                    torch.manual_seed(settings["seed"])
                    oneshot(model=work, processor=tokenizer, dataset=dataset,
                            recipe=_recipe(config, settings, ignore), num_calibration_samples=len(ids),
                            max_seq_length=ids.shape[1], shuffle_calibration_samples=False)
            except Exception as e:  # noqa: BLE001 - any library failure becomes one clear line
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise QuantizationError(f"llmcompressor could not apply {config.name} to this model: "
                                        f"{type(e).__name__}: {first}") from e
            finally:
                reset_session()

    if config.type is QuantizationType.INT4_AWQ and not any(_AWQ_RESOLVED):
        raise QuantizationError(
            f"{config.name}: llmcompressor's AWQ found no layers to smooth in {type(model).__name__} (it knows "
            "Llama-, Qwen-, Mistral-, Gemma- and Phi-style blocks); the result would be plain round-to-nearest. "
            "Use int4-gptq for this model")
    # Give the variant every tensor the algorithm changed (AWQ rescales norms and preceding Linears) ...
    work_state = {k: v for k, v in work.state_dict().items() if not k.endswith(_QUANT_SUFFIXES)}
    target_modules = dict(model.named_modules())
    quantized_keys = {f"{n}.weight" for n in selected}
    with torch.no_grad():
        _take_changed(model, work_state, quantized_keys, config)
        # ... then the de-quantized int4 weights, as new parameters (a tied embedding stays float).
        for n in sorted(selected):
            target = target_modules[n]
            deq = _dequantized(work_modules[n])
            if qparams is not None:
                zero = getattr(work_modules[n], "weight_zero_point", None)
                qparams[n] = (work_modules[n].weight_scale.detach().cpu().clone(),
                              None if zero is None else zero.detach().cpu().clone())
            target.weight = nn.Parameter(deq.detach().to(device=target.weight.device, dtype=target.weight.dtype),
                                         requires_grad=False)
    del work, work_modules

    algo = "GPTQ" if config.type is QuantizationType.INT4_GPTQ else "AWQ"
    scheme = ("symmetric int4, one scale per group" if algo == "GPTQ"
              else "asymmetric int4, a scale and a zero point per group")
    calibration = {**settings, "n_sequences": int(ids.shape[0]), "tokens": int(ids.numel()),
                   "tokens_sha256": token_hash, "text": "english_corpus(include_system_texts=False)",
                   "device": "cpu" if no_accelerator else torch.accelerator.current_accelerator().type}
    if algo == "GPTQ":
        calibration["actorder"] = "static"
    else:
        calibration["awq_mappings"] = max(_AWQ_RESOLVED)
    if patched:
        calibration["patch"] = "IntermediatesCache.pin_memory disabled (no accelerator to pin memory for)"
    return {"library": f"llmcompressor {llmcompressor.__version__} (compressed-tensors "
                       f"{compressed_tensors.__version__})",
            "path": f"de-quantized {algo} weights ({scheme} of {config.group_size}; reference speed)",
            "calibration": calibration}
