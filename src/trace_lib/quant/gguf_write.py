"""A mixed-precision GGUF config as a real ``.gguf`` file, and the ``llama-quantize`` arguments that make it.

:func:`write_mixed_gguf` writes a llama-family model (SmolLM2, Llama 2/3, ...) with each Linear weight in the
ggml type its config gives it (Q4_0, Q8_0, F16, F32...), quantized by gguf-py's reference quantizer
(``gguf.quants.quantize``, bit-exact with ggml) from the reference's weights, exactly as
:func:`~trace_lib.quant.quantize` builds the in-memory variant. Embeddings, norms and layers left in full
precision keep the reference's float type (norms F32, as llama.cpp stores them). The metadata is what
llama.cpp's ``convert_hf_to_gguf.py`` writes for ``LlamaModel`` (hyperparameters; the byte-level BPE tokenizer
as in ``_set_vocab_gpt2``), which is also what transformers' GGUF loader reads back.

llama.cpp stores the Q and K projections with their rows permuted for its rotary embedding
(``LlamaModel.permute`` in convert_hf_to_gguf.py); transformers undoes it on load
(``LlamaTensorProcessor._reverse_permute_weights``). The permutation moves whole rows and GGUF blocks lie
within a row, so quantizing the permuted weight stores exactly the blocks of the unpermuted one.

:func:`llama_quantize_args` gives the options of llama.cpp's ``tools/quantize`` that turn an F32 conversion of
the reference into the same tensor types: ``--tensor-type NAME=TYPE`` per overridden tensor (a regex searched in
each tensor name; every one given here matches one tensor only), ``--token-embedding-type`` and
``--output-tensor-type`` for the tensors trace keeps in float, then the base type.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trace_lib.cache import atomic_write
from trace_lib.errors import OutputPathError, QuantizationError, UnsupportedArchitectureError
from trace_lib.models.load import Loaded
from trace_lib.quant.casts import keeps_weight
from trace_lib.quant.config import CASTS, GGUF_TYPES, QuantizationConfig, QuantizationType, parse_config
from trace_lib.quant.gguf_backend import GGUF_BLOCK
from trace_lib.quant.linears import assign_linears, check_group_size

CAST_GGML = {QuantizationType.FP32: "F32", QuantizationType.FP16: "F16", QuantizationType.BF16: "BF16"}
FLOAT_GGML = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
# llama.cpp's token types (gguf.TokenType): NORMAL 1, UNUSED 5, CONTROL 3 (special), USER_DEFINED 4 (added).
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of the file: its GGUF name, the reference parameter it holds, its ggml type, and the Linear it
    belongs to (``None`` for embeddings, norms and layers the config leaves alone)."""

    name: str
    source: str
    type: str
    module: str | None = None


def gguf_tensor_plan(loaded: Loaded, config: QuantizationConfig | str) -> list[GGUFTensor]:
    """Every tensor :func:`write_mixed_gguf` writes, with its type; checks the model and config can be written."""
    config = _check_writable(parse_config(config))
    model = loaded.model
    _check_llama(model)
    assigned = {name: (m, cfg) for name, m, cfg in assign_linears(model, config)}
    for cfg in sorted({c for _, c in assigned.values() if c.type in GGUF_TYPES}, key=lambda c: c.name):
        check_group_size([(n, m) for n, (m, c) in assigned.items() if c == cfg], GGUF_BLOCK,
                         f"{cfg.name} (GGUF blocks hold {GGUF_BLOCK} weights)")
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    plan = []
    params = dict(model.named_parameters())  # a tied output layer appears once, as the embedding
    for pname, p in params.items():
        module, _, suffix = pname.rpartition(".")
        gname = names.get_name(module)
        if gname is None:
            raise UnsupportedArchitectureError(f"{pname} has no GGUF tensor name in llama.cpp's llama layout")
        if module in assigned:
            plan.append(GGUFTensor(f"{gname}.{suffix}", pname, _ggml_type(assigned[module][1], p), module))
        else:
            plan.append(GGUFTensor(f"{gname}.{suffix}", pname, "F32" if p.ndim == 1 else FLOAT_GGML[p.dtype]))
    if "lm_head.weight" not in params and "lm_head" in assigned:  # tied, but the config gives it its own type
        head, cfg = assigned["lm_head"]
        if not (cfg.type in CASTS and keeps_weight(head.weight, cfg)):
            plan.append(GGUFTensor("output.weight", "lm_head.weight", _ggml_type(cfg, head.weight), "lm_head"))
    return plan


def write_mixed_gguf(loaded: Loaded, config: QuantizationConfig | str, path: str | os.PathLike) -> Path:
    """Write ``loaded`` quantized by ``config`` (a ``gguf-*`` base, optionally with gguf-*/fp32/fp16/bf16
    overrides) as a GGUF file that llama.cpp and transformers load. Returns the path (written atomically)."""
    config = parse_config(config)
    path = Path(path).expanduser()
    if path.suffix.lower() != ".gguf":
        raise OutputPathError(f"{path}: a GGUF file's name ends in .gguf")
    if path.is_dir():
        raise OutputPathError(f"{path} is a folder: give a .gguf file name")
    plan = gguf_tensor_plan(loaded, config)
    import gguf

    model = loaded.model
    cfg = model.config
    weights = {**dict(model.named_parameters()), "lm_head.weight": model.lm_head.weight}  # tied: still the head
    tensors = {t.name: _tensor_data(t, weights[t.source], cfg) for t in plan}

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        writer.add_name(f"{loaded.name} [{config.name}]")
        _add_hyperparameters(writer, cfg)
        writer.add_file_type(int(gguf.LlamaFileType[f"MOSTLY_{GGUF_TYPES[config.type]}"]))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_tokenizer(writer, loaded, cfg.vocab_size)
        for t in plan:
            data, raw_type = tensors[t.name]
            writer.add_tensor(t.name, data, raw_dtype=raw_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    try:
        return atomic_write(path, write)
    except OSError as e:
        raise OutputPathError(f"could not write {path}: {e.strerror or e}") from e


def llama_quantize_args(config: QuantizationConfig | str, loaded: Loaded) -> list[str]:
    """The arguments of llama.cpp's ``llama-quantize`` that give an F32 GGUF of the reference
    (``convert_hf_to_gguf.py --outtype f32``) the tensor types of :func:`write_mixed_gguf`: options first, the
    base type last (the input and output files go before it; see :func:`llama_quantize_command`)."""
    config = parse_config(config)
    plan = gguf_tensor_plan(loaded, config)
    base = GGUF_TYPES[config.type]
    by_name = {t.name: t for t in plan}
    embedding = by_name["token_embd.weight"].type
    output = by_name["output.weight"].type if "output.weight" in by_name else embedding
    args = ["--token-embedding-type", embedding.lower(), "--output-tensor-type", output.lower()]
    for t in plan:
        if t.module is not None and t.name != "output.weight" and t.type != base:
            args += ["--tensor-type", f"{t.name.removesuffix('.weight')}={t.type.lower()}"]
    return [*args, base]


def llama_quantize_command(config: QuantizationConfig | str, loaded: Loaded, source: str = "model-f32.gguf",
                           out: str = "model-mixed.gguf") -> str:
    """The whole ``llama-quantize`` command line (shell-quoted) for :func:`llama_quantize_args`."""
    args = llama_quantize_args(config, loaded)
    return shlex.join(["llama-quantize", *args[:-1], source, out, args[-1]])


def _check_writable(config: QuantizationConfig) -> QuantizationConfig:
    if config.type not in GGUF_TYPES:
        raise QuantizationError(f"{config.name} cannot be written as GGUF: the base must be a gguf-* type "
                                "(gguf-q8_0, gguf-q5_1, gguf-q5_0, gguf-q4_1, gguf-q4_0)")
    if config.act_bits:
        raise QuantizationError(f"{config.name}: a GGUF file stores weights only; drop the -a{config.act_bits} "
                                "activation quantization")
    for pattern, cfg in config.override_configs.items():
        if cfg.type not in GGUF_TYPES and cfg.type not in CASTS:
            raise QuantizationError(f"override {pattern!r}: {cfg.name} has no GGUF tensor type; use a gguf-* type "
                                    "or fp32/fp16/bf16")
    return config


def _check_llama(model: nn.Module) -> None:
    cfg = model.config
    if cfg.model_type != "llama":
        raise UnsupportedArchitectureError(f"writing a GGUF file supports llama-family models (model_type 'llama', "
                                           f"e.g. SmolLM2), not {cfg.model_type!r}")
    rope = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise UnsupportedArchitectureError(f"writing a GGUF file supports default RoPE only, not "
                                           f"{rope.get('rope_type', rope.get('type'))!r} scaling")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise UnsupportedArchitectureError(f"writing a llama GGUF file needs the SiLU MLP, not {cfg.hidden_act!r}")
    biased = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.bias is not None]
    if biased:
        raise UnsupportedArchitectureError(f"{biased[0]} has a bias, which llama.cpp's llama layout does not store")


def _ggml_type(cfg: QuantizationConfig, weight: torch.Tensor) -> str:
    if cfg.type in GGUF_TYPES:
        return GGUF_TYPES[cfg.type]
    return FLOAT_GGML[weight.dtype] if keeps_weight(weight, cfg) else CAST_GGML[cfg.type]


def _permuted(w: np.ndarray, name: str, cfg: Any) -> np.ndarray:
    """llama.cpp's row order for Q and K (convert_hf_to_gguf.py ``LlamaModel.permute``)."""
    if not (name.endswith("attn_q.weight") or name.endswith("attn_k.weight")):
        return w
    heads = cfg.num_attention_heads if name.endswith("attn_q.weight") else cfg.num_key_value_heads
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensor_data(t: GGUFTensor, p: torch.Tensor, cfg: Any) -> tuple[np.ndarray, Any]:
    """The bytes (or float array) of one tensor and its raw ggml type (``None``: taken from the numpy dtype)."""
    from gguf import GGMLQuantizationType, quants

    w = _permuted(p.detach().to(torch.float32).cpu().numpy(), t.name, cfg)
    if t.type == "F32":
        return np.ascontiguousarray(w, dtype=np.float32), None
    if t.type == "F16":
        return np.ascontiguousarray(w.astype(np.float16)), None  # round to nearest even, as torch's cast
    qtype = GGMLQuantizationType[t.type]  # BF16 and the block formats: gguf-py's bit-exact ports of ggml
    return quants.quantize(np.ascontiguousarray(w), qtype), qtype


def _add_hyperparameters(writer: Any, cfg: Any) -> None:
    """The ``llama.*`` keys of convert_hf_to_gguf.py (``TextModel.set_gguf_parameters``, ``LlamaModel``)."""
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(cfg.num_key_value_heads or heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != cfg.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(cfg.vocab_size)


def _add_tokenizer(writer: Any, loaded: Loaded, vocab_size: int) -> None:
    """A byte-level BPE tokenizer (SmolLM2, Llama 3, GPT-2 style) as convert_hf_to_gguf.py's ``_set_vocab_gpt2``
    writes it: the tokens by id (padded to the model's vocabulary with ``[PAD{i}]``), their types, the merges,
    the special token ids, the BOS flag and the chat template."""
    tok = loaded.tokenizer
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise QuantizationError("writing a GGUF file needs the model's (fast) tokenizer; load the model from a "
                                "folder or GGUF file that has one")
    spec = json.loads(backend.to_str())
    if spec["model"].get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise QuantizationError("writing a GGUF file supports byte-level BPE tokenizers (SmolLM2, Llama 3, GPT-2 "
                                f"style), not a {spec['model'].get('type')} tokenizer")
    vocab = tok.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise QuantizationError(f"the tokenizer has token ids up to {max(vocab.values())}, beyond the model's "
                                f"vocabulary of {vocab_size}")
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [UNUSED] * vocab_size
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = (CONTROL if added[i].get("special") else USER_DEFINED) if i in added else NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(spec, loaded.source))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                     ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        if isinstance(getattr(tok, key, None), int):
            add(getattr(tok, key))
    if isinstance(getattr(tok, "add_bos_token", None), bool):
        writer.add_add_bos_token(tok.add_bos_token)
    if isinstance(getattr(tok, "chat_template", None), str):
        writer.add_chat_template(tok.chat_template)


def _pre_tokenizer(spec: dict, source: str) -> str:
    """llama.cpp's name for how text is split before BPE (``tokenizer.ggml.pre``): the source GGUF's own when
    the model came from one, else read off the tokenizer: digits split one by one then GPT-2's regex is
    ``smollm``, GPT-2's regex alone ``gpt2``, anything else ``default``."""
    if source.lower().endswith(".gguf") and Path(source).is_file():
        from gguf import GGUFReader

        field = GGUFReader(source).fields.get("tokenizer.ggml.pre")
        if field is not None:
            return str(field.contents())
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [(s.get("type"), s.get("individual_digits"), s.get("use_regex")) for s in steps]
    if kinds == [("Digits", True, None), ("ByteLevel", None, True)]:
        return "smollm"
    if kinds == [("ByteLevel", None, True)]:
        return "gpt2"
    return "default"
