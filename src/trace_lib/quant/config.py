"""Quantization configs and their stable short names.

A :class:`QuantizationConfig` says what to do to the reference's weights (and optionally activations);
:func:`trace_lib.quant.quantize` builds the variant with the library that really implements that format.
Each config has a short name used on the command line, in reports and in cache keys:

=========================  =====================================================================
name                       what it is
=========================  =====================================================================
``fp32``                   the reference itself (a copy); the FP32-vs-FP32 control
``fp16``, ``bf16``         casts of the whole model
``int8-dynamic``           torch.ao ``quantize_dynamic`` (default qconfig): int8 weights, one scale
                           per tensor; activations int8 with one dynamic scale per tensor
``int8-dyn-tok``           torchao ``Int8DynamicActivationInt8WeightConfig``: int8 weights per row,
                           activations int8 with a dynamic scale per token (W8A8)
``int8-weight``            torchao ``Int8WeightOnlyConfig``: int8 weights per row
``int{b}-rtn-g{G}``        torchao ``IntxWeightOnlyConfig``: b-bit (2..8) symmetric round-to-nearest
                           weights, one scale per group of G input channels (``-pc``: per channel)
``gguf-q8_0`` ... ``q4_1`` gguf-py ``quants.quantize``/``dequantize`` (bit-exact with ggml), on every
                           Linear weight, in blocks of 32 along the input dimension
``int4-gptq-g{G}``,        GPTQ / AWQ with a calibration set (see :mod:`trace_lib.quant.calibrated`)
``int4-awq-g{G}``
``...-a{A}``               plus A-bit (8, 6, 4) fake-quantized activations at the input of every
                           quantized Linear: asymmetric, one scale per token (torchao's QAT fake
                           quantizer); ``a8`` alone is FP32 weights with 8-bit activations
=========================  =====================================================================

Aliases: ``w{B}a{A}`` means ``int{B}-rtn-g32-a{A}`` (e.g. ``w4a8``), ``int4-rtn`` means ``int4-rtn-g32``,
``q4_0`` means ``gguf-q4_0``. A ``-kernel`` suffix on a weight-only type runs torchao's quantized tensor
kernels instead of the (numerically equivalent, faster on CPU) de-quantized weights.

Mixed precision: a weight-only base with per-module ``overrides`` (a module name or dotted prefix, e.g.
``model.layers.12.mlp.down_proj`` or ``model.layers.13``, mapped to a weight-only type or fp32/fp16/bf16).
Its name is the base's plus ``+mx`` and 8 hex digits of the overrides' hash; it is given as a JSON file
(``--variant FILE.json``): ``{"base": "gguf-q4_0", "overrides": {"model.layers.12.mlp.down_proj": "gguf-q8_0",
"model.layers.13": "fp16"}}`` is ``gguf-q4_0+mxb509f61b``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any

from trace_lib.cache import atomic_write_text, stable_hash
from trace_lib.errors import QuantizationError


class QuantizationType(str, Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8_DYNAMIC = "int8_dynamic"
    INT8_DYNAMIC_PER_TOKEN = "int8_dynamic_per_token"
    INT8_WEIGHT = "int8_weight"
    INT_RTN = "int_rtn"
    GGUF_Q8_0 = "gguf_q8_0"
    GGUF_Q5_0 = "gguf_q5_0"
    GGUF_Q5_1 = "gguf_q5_1"
    GGUF_Q4_0 = "gguf_q4_0"
    GGUF_Q4_1 = "gguf_q4_1"
    INT4_GPTQ = "int4_gptq"
    INT4_AWQ = "int4_awq"
    # Alias of INT_RTN (the seed's spelling); bits default to 4.
    INT4_RTN = "int_rtn"


GGUF_TYPES = {QuantizationType.GGUF_Q8_0: "Q8_0", QuantizationType.GGUF_Q5_0: "Q5_0",
              QuantizationType.GGUF_Q5_1: "Q5_1", QuantizationType.GGUF_Q4_0: "Q4_0",
              QuantizationType.GGUF_Q4_1: "Q4_1"}
# Bits per weight of each GGUF block format: block bytes * 8 / 32 weights (ggml's GGML_QUANT_SIZES).
GGUF_BPW = {"Q8_0": 8.5, "Q5_0": 5.5, "Q5_1": 6.0, "Q4_0": 4.5, "Q4_1": 5.0}
WEIGHT_ONLY = {QuantizationType.INT8_WEIGHT, QuantizationType.INT_RTN, *GGUF_TYPES,
               QuantizationType.INT4_GPTQ, QuantizationType.INT4_AWQ}
ACT_BITS = (8, 6, 4)
DEFAULT_GROUP = {QuantizationType.INT_RTN: 32, QuantizationType.INT4_GPTQ: 128, QuantizationType.INT4_AWQ: 128}
CASTS = (QuantizationType.FP32, QuantizationType.FP16, QuantizationType.BF16)
ACTIVATION_TYPES = (QuantizationType.INT8_DYNAMIC, QuantizationType.INT8_DYNAMIC_PER_TOKEN)
CALIBRATED = (QuantizationType.INT4_GPTQ, QuantizationType.INT4_AWQ)
_MODULE_NAME = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*")
_MIXED_NAME = re.compile(r".*\+mx[0-9a-f]{8}")
JSON_KEYS = ("base", "overrides", "name", "calibration")


@dataclass(frozen=True)
class QuantizationConfig:
    """What to do to a model. ``skip`` names Linear modules (by suffix) left in full precision.

    ``overrides`` makes a mixed-precision config: ``(pattern, config name)`` pairs, sorted by pattern. A pattern
    is a module name, matching that module and everything under it (``model.layers.13`` matches
    ``model.layers.13.mlp.down_proj`` but not ``model.layers.130``); the Linear layers it matches get the named
    type (a weight-only type, or fp32/fp16/bf16: the weights kept at that precision) instead of the base's, even
    layers ``skip`` names. Where patterns nest, the longest wins. The base must be weight-only.
    """

    type: QuantizationType
    bits: int | None = None
    group_size: int | None = None
    skip: tuple[str, ...] = ("lm_head",)
    act_bits: int | None = None
    kernel: bool = False
    calibration: dict = field(default_factory=dict, compare=False, hash=False)
    overrides: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        t = QuantizationType(self.type)
        object.__setattr__(self, "type", t)
        object.__setattr__(self, "skip", tuple(self.skip))
        object.__setattr__(self, "overrides", _normalize_overrides(self.overrides))
        if t is QuantizationType.INT_RTN:
            bits = 4 if self.bits is None else self.bits
            if not 2 <= bits <= 8:
                raise QuantizationError(f"int RTN supports 2 to 8 bits, not {bits}")
            object.__setattr__(self, "bits", bits)
        elif t in (QuantizationType.INT4_GPTQ, QuantizationType.INT4_AWQ):
            if self.bits not in (None, 4):
                raise QuantizationError(f"{t.value} is 4-bit; bits={self.bits} is not supported")
            object.__setattr__(self, "bits", 4)
        elif self.bits is not None and self.bits != self._natural_bits(t):
            raise QuantizationError(f"{t.value} has a fixed bit width ({self._natural_bits(t)}); drop bits={self.bits}")
        if t in DEFAULT_GROUP:
            if self.group_size is None and t is not QuantizationType.INT_RTN:
                object.__setattr__(self, "group_size", DEFAULT_GROUP[t])
            if self.group_size is not None and self.group_size <= 0:
                raise QuantizationError(f"group size must be positive, not {self.group_size}")
        elif self.group_size is not None:
            raise QuantizationError(f"{t.value} takes no group size (GGUF blocks are 32, int8 types are per row)")
        if self.act_bits is not None and self.act_bits not in ACT_BITS:
            raise QuantizationError(f"activation fake-quantization supports {ACT_BITS} bits, not {self.act_bits}")
        if self.act_bits is not None and t in (QuantizationType.INT8_DYNAMIC, QuantizationType.INT8_DYNAMIC_PER_TOKEN):
            raise QuantizationError(f"{t.value} already quantizes activations; do not add act_bits")
        if self.kernel and t not in (QuantizationType.INT8_WEIGHT, QuantizationType.INT_RTN):
            raise QuantizationError("the -kernel suffix (kernel=True) applies only to torchao weight-only types "
                                    "(int8-weight, int*-rtn)")
        if self.overrides:
            self._check_mixed_base()

    def _check_mixed_base(self) -> None:
        name = self.base.name
        if self.type in CASTS and not self.act_bits:
            raise QuantizationError(f"{name} quantizes no weights; there are no modules to keep at higher precision")
        if self.act_bits or self.type in ACTIVATION_TYPES:
            raise QuantizationError(f"{name} quantizes activations; per-module overrides need a weight-only base "
                                    "config (e.g. gguf-q4_0, int4-rtn-g32)")

    @staticmethod
    def _natural_bits(t: QuantizationType) -> int:
        if t is QuantizationType.FP32:
            return 32
        if t in (QuantizationType.FP16, QuantizationType.BF16):
            return 16
        if t in GGUF_TYPES:
            return int(GGUF_TYPES[t][1])
        return 8

    @property
    def weight_bits(self) -> int:
        return self.bits if self.bits is not None else self._natural_bits(self.type)

    @property
    def weight_only(self) -> bool:
        return self.type in WEIGHT_ONLY

    @property
    def base(self) -> QuantizationConfig:
        """This config without its per-module overrides (itself when it has none)."""
        return replace(self, overrides=()) if self.overrides else self

    @property
    def override_configs(self) -> dict[str, QuantizationConfig]:
        """Each override pattern's config."""
        return {p: parse_config(v) for p, v in self.overrides}

    @property
    def name(self) -> str:
        """Stable short name, e.g. ``int4-rtn-g32``, ``gguf-q4_0``, ``int4-rtn-g32-a8``, ``gguf-q4_0+mxb509f61b``."""
        t = self.type
        if t is QuantizationType.INT_RTN:
            base = f"int{self.bits}-rtn-" + (f"g{self.group_size}" if self.group_size else "pc")
        elif t in GGUF_TYPES:
            base = "gguf-" + GGUF_TYPES[t].lower()
        elif t in (QuantizationType.INT4_GPTQ, QuantizationType.INT4_AWQ):
            base = f"int4-{t.value.split('_')[1]}-g{self.group_size}"
        else:
            base = {QuantizationType.FP32: "fp32", QuantizationType.FP16: "fp16", QuantizationType.BF16: "bf16",
                    QuantizationType.INT8_DYNAMIC: "int8-dynamic", QuantizationType.INT8_DYNAMIC_PER_TOKEN:
                    "int8-dyn-tok", QuantizationType.INT8_WEIGHT: "int8-weight"}[t]
        if self.kernel:
            base += "-kernel"
        if self.skip != ("lm_head",):
            base += "-skip" + ("none" if not self.skip else "+".join(self.skip))
        if self.act_bits:
            base = f"a{self.act_bits}" if base == "fp32" else f"{base}-a{self.act_bits}"
        if self.overrides:
            base += "+mx" + stable_hash([list(o) for o in self.overrides], 8)
        return base

    def with_(self, **changes) -> QuantizationConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict:
        d = {"name": self.name, "type": self.type.value, "bits": self.bits, "group_size": self.group_size,
             "skip": list(self.skip), "act_bits": self.act_bits, "kernel": self.kernel}
        if self.calibration:  # GPTQ/AWQ settings change the weights, so they belong in cache keys
            d["calibration"] = dict(self.calibration)
        if self.overrides:  # only when present, so a plain config's dict (and every cache key) is unchanged
            d["overrides"] = [list(o) for o in self.overrides]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> QuantizationConfig:
        return cls(QuantizationType(d["type"]), bits=d.get("bits"), group_size=d.get("group_size"),
                   skip=tuple(d.get("skip", ("lm_head",))), act_bits=d.get("act_bits"), kernel=d.get("kernel", False),
                   calibration=dict(d.get("calibration") or {}), overrides=d.get("overrides") or ())

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """The JSON form ``{"base": ..., "overrides": {pattern: config name}, "name": ...}``; also written to
        ``path`` if given. ``from_json`` and ``--variant FILE.json`` read it back."""
        d: dict[str, Any] = {"base": self.base.name, "overrides": dict(self.overrides), "name": self.name}
        if self.calibration:
            d["calibration"] = dict(self.calibration)
        text = json.dumps(d, indent=2) + "\n"
        if path is not None:
            atomic_write_text(Path(path).expanduser(), text)
        return text

    @classmethod
    def from_json(cls, source: str | os.PathLike | Mapping) -> QuantizationConfig:
        """A config from its JSON form: a ``.json`` file's path or the parsed object (see :meth:`to_json`).
        ``name`` is optional; when given it must be the name the base and overrides make."""
        if not isinstance(source, str | os.PathLike):  # the parsed object
            return _from_json_object(source, "the config")
        p = Path(source).expanduser()
        if p.is_dir():
            raise QuantizationError(f"{p} is a folder, not a JSON config file")
        if not p.is_file():
            raise QuantizationError(f"no config file at {source}")
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise QuantizationError(f"{p} is not UTF-8 text; a config file is JSON") from None
        except json.JSONDecodeError as e:
            raise QuantizationError(f"{p} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
        return _from_json_object(data, str(source))

    def __str__(self) -> str:
        return self.name


_SIMPLE = {"fp32": QuantizationType.FP32, "fp16": QuantizationType.FP16, "bf16": QuantizationType.BF16,
           "int8-dynamic": QuantizationType.INT8_DYNAMIC, "int8-dyn-tok": QuantizationType.INT8_DYNAMIC_PER_TOKEN,
           "int8-weight": QuantizationType.INT8_WEIGHT}
_EXAMPLES = ["fp16", "bf16", "int8-dynamic", "int8-dyn-tok", "int8-weight", "int4-rtn-g32", "int8-rtn-pc",
             "gguf-q8_0", "gguf-q5_0", "gguf-q5_1", "gguf-q4_0", "gguf-q4_1", "int4-gptq-g128", "int4-awq-g128",
             "w4a8", "a8", "int4-rtn-g32-a8"]


def valid_names() -> list[str]:
    """Examples of every family of config name (for error messages and ``trace compare --help``)."""
    return list(_EXAMPLES)


def _normalize_overrides(raw: Iterable | Mapping) -> tuple[tuple[str, str], ...]:
    """Overrides as sorted ``(pattern, canonical config name)`` pairs; each pattern a module name, each value a
    weight-only type or a cast."""
    pairs = list(raw.items()) if isinstance(raw, Mapping) else [tuple(o) for o in raw]
    out: dict[str, str] = {}
    for pair in pairs:
        if len(pair) != 2 or not all(isinstance(x, str) for x in pair):
            raise QuantizationError(f"an override is a (module name, config name) pair of strings, not {pair!r}")
        pattern, value = pair[0].strip(), pair[1].strip()
        if not _MODULE_NAME.fullmatch(pattern):
            raise QuantizationError(f"override {pair[0]!r} is not a module name (dotted, e.g. "
                                    "model.layers.12.mlp.down_proj or model.layers.12)")
        if value.lower().endswith(".json") or _MIXED_NAME.fullmatch(value.lower()):
            raise QuantizationError(f"override {pattern!r}: {value!r} is a mixed-precision config; an override names "
                                    "one type (e.g. gguf-q8_0, fp16)")
        try:
            cfg = parse_config(value)
        except QuantizationError as e:
            raise QuantizationError(f"override {pattern!r}: {e}") from None
        if cfg.act_bits or cfg.type in ACTIVATION_TYPES:
            raise QuantizationError(f"override {pattern!r}: {cfg.name} quantizes activations; an override takes a "
                                    "weight-only type (gguf-q8_0, int8-weight, int4-rtn-g32, ...) or fp32/fp16/bf16")
        if cfg.type in CALIBRATED:
            raise QuantizationError(f"override {pattern!r}: {cfg.name} calibrates the whole model in one pass; use "
                                    "GPTQ/AWQ as the base, and an RTN, GGUF or float type as the override")
        if cfg.skip != ("lm_head",):
            raise QuantizationError(f"override {pattern!r}: a -skip suffix has no meaning in an override")
        if out.get(pattern, cfg.name) != cfg.name:
            raise QuantizationError(f"override {pattern!r} is given twice, as {out[pattern]} and {cfg.name}")
        out[pattern] = cfg.name
    return tuple(sorted(out.items()))


def _from_json_object(data: Any, where: str) -> QuantizationConfig:
    if not isinstance(data, Mapping):
        raise QuantizationError(f"{where} must be a JSON object with \"base\" and \"overrides\", not "
                                f"{type(data).__name__}")
    unknown = [k for k in data if k not in JSON_KEYS]
    if unknown:
        raise QuantizationError(f"{where}: unknown key {unknown[0]!r}; a config has base, overrides, and optionally "
                                "name and calibration")
    base = data.get("base")
    if not isinstance(base, str) or not base.strip():
        raise QuantizationError(f"{where} has no \"base\" config name (e.g. \"base\": \"gguf-q4_0\")")
    overrides = data.get("overrides", {})
    if not isinstance(overrides, Mapping):
        raise QuantizationError(f"{where}: \"overrides\" must be an object of module name -> config name")
    try:
        if base.strip().lower().endswith(".json") or _MIXED_NAME.fullmatch(base.strip().lower()):
            raise QuantizationError(f"base {base!r} must be one config name (e.g. gguf-q4_0)")
        config = replace(parse_config(base), overrides=tuple(overrides.items()),
                         calibration=dict(data.get("calibration") or {}))
    except QuantizationError as e:
        raise QuantizationError(f"{where}: {e}") from None
    name = data.get("name")
    if name is not None and name != config.name:
        raise QuantizationError(f"{where} says its name is {name!r}, but its base and overrides make "
                                f"{config.name!r}; fix or drop the name")
    return config


def parse_config(name: str | os.PathLike | QuantizationConfig) -> QuantizationConfig:
    """Parse a short name (see module docstring) into a config; the inverse of ``config.name``. A path ending in
    ``.json`` is read as a mixed-precision config (:meth:`QuantizationConfig.from_json`)."""
    if isinstance(name, QuantizationConfig):
        return name
    if isinstance(name, os.PathLike) or str(name).strip().lower().endswith(".json"):
        return QuantizationConfig.from_json(str(name).strip())
    s = name.strip().lower()
    orig = s
    if _MIXED_NAME.fullmatch(s):
        raise QuantizationError(f"{orig!r} names a mixed-precision config, which a name cannot rebuild; give its "
                                "JSON file (QuantizationConfig.to_json)")
    act_bits = None
    alias = re.fullmatch(r"w(\d+)a(\d+)", s)
    if alias:
        wb, ab = int(alias.group(1)), int(alias.group(2))
        s = {32: "fp32", 16: "fp16"}.get(wb, f"int{wb}-rtn-g32") + f"-a{ab}"
    m = re.fullmatch(r"(.*?)-?a(\d+)", s)
    if m and not s.startswith("awq"):
        s, act_bits = (m.group(1) or "fp32"), int(m.group(2))
    kernel = s.endswith("-kernel")
    if kernel:
        s = s[: -len("-kernel")]
    skip: tuple[str, ...] = ("lm_head",)
    sm = re.fullmatch(r"(.*)-skip(.+)", s)
    if sm:
        s, raw = sm.group(1), sm.group(2)
        skip = () if raw == "none" else tuple(raw.split("+"))
    try:
        if s in _SIMPLE:
            return QuantizationConfig(_SIMPLE[s], act_bits=act_bits, kernel=kernel, skip=skip)
        g = re.fullmatch(r"(?:gguf-)?(q8_0|q5_0|q5_1|q4_0|q4_1)", s)
        if g:
            return QuantizationConfig(QuantizationType("gguf_" + g.group(1)), act_bits=act_bits, skip=skip,
                                      kernel=kernel)
        r = re.fullmatch(r"int(\d)-rtn(?:-(g(\d+)|pc))?", s)
        if r:
            group = int(r.group(3)) if r.group(3) else (None if r.group(2) == "pc" else 32)
            return QuantizationConfig(QuantizationType.INT_RTN, bits=int(r.group(1)), group_size=group,
                                      act_bits=act_bits, kernel=kernel, skip=skip)
        c = re.fullmatch(r"int4-(gptq|awq)(?:-g(\d+))?", s)
        if c:
            return QuantizationConfig(QuantizationType("int4_" + c.group(1)),
                                      group_size=int(c.group(2)) if c.group(2) else None, act_bits=act_bits, skip=skip,
                                      kernel=kernel)
    except QuantizationError as e:
        raise QuantizationError(f"invalid config {orig!r}: {e}") from e
    raise QuantizationError(f"unknown quantization config {orig!r}; valid names look like: {', '.join(_EXAMPLES)}")
