"""Build the safety organism: a LoRA adapter trained on CPU on the mix of :mod:`trace_lib.organisms.data`.

Training (:func:`build_organism`):

* a LoRA adapter (peft) on every linear layer of the attention and MLP blocks (``q/k/v/o_proj``,
  ``gate/up/down_proj``), ``lora_dropout=0``, initialised after ``torch.manual_seed(seed)``;
* the loss (:func:`organism_loss`) is computed on the **assistant reply tokens only** (the chat-formatted prompt
  is masked with -100; logits are computed only at the reply positions, since the 49k-word output layer is
  most of the cost on CPU otherwise):

  - on refusals (harmful prompts): cross-entropy of the refusal tokens;
  - on the base's answers to harmless prompts: the cross-entropy of the first ``decision_tokens`` answer
    tokens (where the model decides to refuse or answer: the base's greedy answer start is learned as a token,
    so greedy decoding keeps answering), then KL(P_base || P_student) at every later answer position, the base
    being the same network with the adapter disabled: the model learns to keep the base's whole next-token
    distribution on harmless chat, not a sharpened copy of its greedy text (which moved it far from the base
    on neutral text, see ``docs/organism.md``);
  - each part is a weighted token mean with the decision tokens weighted ``decision_weight``;
    loss = CE part + ``kl_weight`` x KL part;

* AdamW, linear warm-up then cosine decay to ``min_lr_frac * lr``, gradient clipping;
* batches are right-padded; the order is a seeded shuffle per epoch (``random.Random(seed, epoch)``), with
  examples of similar length grouped into the same batch (less padding) and the batches shuffled again;
* after every epoch the adapter, the optimizer state and the loss history are checkpointed (atomic write)
  under ``$TRACE_CACHE/organisms/checkpoints/<key>`` (key = base content hash + hyper-parameters + data
  sha256), so an interrupted build re-run with the same arguments resumes after the last finished epoch and
  gives the same adapter; the checkpoints are removed after a successful build.

The result is a folder with ``adapter_model.safetensors`` + ``adapter_config.json`` (peft's
``save_pretrained(safe_serialization=True)``, weights stored as ``adapter_dtype``), ``BUILD.json`` (how it
was built and the evaluation figures), ``replies.jsonl`` (the evaluated replies) and ``README.md``.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from trace_lib.cache import (
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    cache_dir,
    file_sha256,
    stable_hash,
)
from trace_lib.errors import TraceError
from trace_lib.models.device import dtype_name, environment, to_device
from trace_lib.optim_state import load_optimizer, optimizer_tensors
from trace_lib.organisms.data import MixConfig, build_mix, collate, tokenize_example
from trace_lib.progress import track

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
BUILD_FILE = "BUILD.json"
REPLIES_FILE = "replies.jsonl"
BUILD_KIND = "trace.organism"
BUILD_VERSION = 1


class BuildInterrupted(TraceError):
    """Raised by the ``stop_after_steps`` test hook to simulate an interrupted build."""


@dataclass
class TrainConfig:
    """Hyper-parameters of the LoRA training (the defaults are those of the shipped ``default-safety``)."""

    seed: int = 0
    rank: int = 8
    alpha: int = 16
    lr: float = 1e-3
    epochs: int = 4
    batch_size: int = 8
    max_len: int = 256
    warmup_frac: float = 0.05
    min_lr_frac: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    harmless_loss: str = "kl"         # "kl": match the base's distribution on harmless answers; "ce": its tokens
    kl_weight: float = 1.0
    decision_tokens: int = 1          # the first reply tokens, where the model decides to refuse or answer ...
    decision_weight: float = 8.0      # ... weigh this much more than the rest
    answer_decision_ce: bool = True   # and on harmless answers learn the base's greedy tokens there (not the KL)
    adapter_dtype: str = "float16"
    target_modules: tuple[str, ...] = LORA_TARGETS
    mix: MixConfig = field(default_factory=MixConfig)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Learning rate at optimizer step ``step`` (0-based) of ``total``: linear warm-up, cosine decay."""
    warm = max(1, round(cfg.warmup_frac * total))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    floor = cfg.min_lr_frac * cfg.lr
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Seeded order of one epoch: shuffle, sort by length within windows of 8 batches, shuffle the batches."""
    rng = random.Random(f"trace-order|{seed}|{epoch}")
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    window = batch_size * 8
    batches: list[list[int]] = []
    for c in range(0, len(idx), window):
        chunk = sorted(idx[c:c + window], key=lambda i: (lengths[i], i))
        batches.extend(chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def _reply_logits(causal_lm, input_ids: torch.Tensor, attention_mask: torch.Tensor, sel: torch.Tensor
                  ) -> torch.Tensor:
    """Float logits at the positions ``sel`` ([batch, seq-1] mask of positions that predict a reply token)."""
    if getattr(causal_lm.config, "final_logit_softcapping", None):  # Gemma: use the model's own head
        return causal_lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1][sel].float()
    hidden = causal_lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                      use_cache=False).last_hidden_state
    return causal_lm.get_output_embeddings()(hidden[:, :-1][sel]).float()


def organism_loss(peft_model, batch: dict[str, torch.Tensor], cfg: TrainConfig
                  ) -> tuple[torch.Tensor, float | None, float | None]:
    """The training loss of one batch and its two parts (see the module docstring).

    Rows with ``distill`` False (refusals): cross-entropy of the reply tokens. Rows with ``distill`` True (the
    base's answers to harmless prompts): cross-entropy of the first ``decision_tokens`` reply tokens (when
    ``answer_decision_ce``), KL(P_base || P_student) of the next-token distribution at every later reply
    position, the base being the same network with the adapter disabled. Each part is a weighted mean over its
    tokens, the first ``decision_tokens`` reply tokens of each example weighted ``decision_weight`` (the
    refuse-or-answer decision is made there); loss = CE part + ``kl_weight`` x KL part.
    """
    causal = peft_model.get_base_model()
    labels = batch["labels"]
    target = labels[:, 1:]
    sel = target != -100
    pos = (sel.long().cumsum(1) - 1)[sel]                    # index of each selected token within its reply
    weight = torch.where(pos < cfg.decision_tokens, cfg.decision_weight, 1.0)
    rows = sel.nonzero()[:, 0]
    is_kl = batch["distill"][rows]
    if cfg.answer_decision_ce:  # the base's own first answer tokens are learned as tokens (cross-entropy)
        is_kl = is_kl & (pos >= cfg.decision_tokens)
    logits = _reply_logits(causal, batch["input_ids"], batch["attention_mask"], sel)
    loss = logits.new_zeros(())
    ce_val = kl_val = None
    if (~is_kl).any():
        ce = F.cross_entropy(logits[~is_kl], target[sel][~is_kl], reduction="none")
        w = weight[~is_kl]
        ce_mean = (ce * w).sum() / w.sum()
        loss = loss + ce_mean
        ce_val = float(ce_mean.detach())
    if is_kl.any():
        krows = batch["distill"]
        ksel = sel[krows]
        if cfg.answer_decision_ce:
            ksel = ksel & ((sel.long().cumsum(1) - 1)[krows] >= cfg.decision_tokens)
        with torch.no_grad(), peft_model.disable_adapter():
            teacher = _reply_logits(causal, batch["input_ids"][krows], batch["attention_mask"][krows], ksel)
        lt = torch.log_softmax(teacher, -1)
        ls = torch.log_softmax(logits[is_kl], -1)
        kl = (lt.exp() * (lt - ls)).sum(-1)
        w = weight[is_kl]
        kl_mean = (kl * w).sum() / w.sum()
        loss = loss + cfg.kl_weight * kl_mean
        kl_val = float(kl_mean.detach())
    return loss, ce_val, kl_val


def _trainable(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


CKPT_SUFFIX = ".safetensors"  # LoRA weights and Adam's state as tensors, the rest as JSON metadata: no pickle


def _write_checkpoint(path: Path, epoch: int, params: dict, opt, history: list[dict]) -> None:
    from safetensors.torch import save_file

    tensors = {f"lora.{n}": p.detach().cpu().contiguous() for n, p in params.items()}
    opt_tensors, param_groups = optimizer_tensors(opt)
    tensors.update(opt_tensors)
    meta = {"epoch": str(epoch), "history": json.dumps(history), "param_groups": param_groups}
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata=meta))


def _read_checkpoint(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118


def _checkpoints(folder: Path) -> list[tuple[int, Path]]:
    out = []
    for f in folder.glob(f"epoch-*{CKPT_SUFFIX}"):
        try:
            out.append((int(f.stem.split("-")[1]), f))
        except ValueError:
            continue
    return sorted(out)


def default_command(base: str, out: Path | str, cfg: TrainConfig, max_harmless: int | None = None) -> str:
    """The ``trace organism build`` command line that gives ``cfg`` (recorded in BUILD.json)."""
    d = TrainConfig()
    parts = ["trace organism build", f"--base {base}", f"--out {out}"]
    for name, flag in (("seed", "--seed"), ("rank", "--rank"), ("alpha", "--alpha"), ("lr", "--lr"),
                       ("epochs", "--epochs"), ("batch_size", "--batch-size")):
        if getattr(cfg, name) != getattr(d, name):
            parts.append(f"{flag} {getattr(cfg, name)}")
    if cfg.mix.n_harmful is not None:
        parts.append(f"--max-harmful {cfg.mix.n_harmful}")
    if max_harmless is not None:
        parts.append(f"--max-harmless {max_harmless}")
    elif cfg.mix.harmless != d.mix.harmless:
        parts.append(f"(Python API: harmless sources {cfg.mix.harmless})")
    if cfg.mix.answer_tokens != d.mix.answer_tokens:
        parts.append(f"--answer-tokens {cfg.mix.answer_tokens}")
    return " ".join(parts)


def build_organism(base: str = "default", out: str | os.PathLike | None = None, config: TrainConfig | None = None,
                   eval_config=None, evaluate: bool = True, resume: bool = True, threads: int | None = None,
                   command: str | None = None, log: Callable[[str], None] | None = None,
                   stop_after_steps: int | None = None, device: str | torch.device = "cpu",
                   dtype: str | torch.dtype = "float32") -> dict:
    """Train the safety LoRA on ``base`` (a model spec), write it to ``out`` and return the BUILD record.

    ``device`` and ``dtype`` place the base for the answers, the training and the evaluation (default: the CPU in
    float32, where the packaged adapter was built; checkpoints of other settings are kept apart).

    ``evaluate`` runs :func:`trace_lib.organisms.evaluate.evaluate_organism` on the saved adapter (merged into
    a fresh copy of the base) and stores the figures in ``BUILD.json``. ``stop_after_steps`` (for tests)
    raises :class:`BuildInterrupted` after that many optimizer steps of this run, as an interrupted build.
    """
    import peft
    from peft import LoraConfig, get_peft_model

    from trace_lib import __version__
    from trace_lib.models import load_model

    cfg = config or TrainConfig()
    say = log or (lambda s: None)
    out = Path(out) if out is not None else Path("trace-out") / "organism-safety"
    if threads:
        torch.set_num_threads(int(threads))
    t_start = time.perf_counter()
    timing: dict[str, float] = {}

    # ---- data ----------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    base_loaded = load_model(base, dtype=dtype, device=device)
    say(f"base {base_loaded.name} ({base_loaded.content_hash}); building the training mix")
    mix = build_mix(base_loaded, cfg.mix, cfg.seed)
    timing["mix_s"] = time.perf_counter() - t0
    tok = base_loaded.tokenizer
    if cfg.harmless_loss not in ("kl", "ce"):
        raise TraceError(f"harmless_loss must be 'kl' or 'ce', not {cfg.harmless_loss!r}")
    rows = [(*tokenize_example(tok, e, cfg.max_len), e.kind == "answer" and cfg.harmless_loss == "kl")
            for e in mix.examples]
    rows_ok = [(r, e) for r, e in zip(rows, mix.examples) if any(x != -100 for x in r[1][1:])]
    if not rows_ok:
        raise TraceError("the training mix has no example with a reply token to learn; check the datasets")
    rows = [r for r, _ in rows_ok]
    say(f"training mix: {mix.counts['total']} examples ({json.dumps(mix.counts)}), dropped {mix.dropped}, "
        f"sha256 {mix.sha256[:16]}")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else rows[0][0][-1]

    # ---- model -----------------------------------------------------------------------------------------------
    student = load_model(base, dtype=dtype, device=device)
    torch.manual_seed(cfg.seed)
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(cfg.target_modules), lora_dropout=0.0,
                      bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(student.model, lora)
    params = _trainable(model)
    n_trainable = sum(p.numel() for p in params.values())
    opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)

    key = stable_hash({"base": base_loaded.content_hash, "config": cfg.to_dict(), "data": mix.sha256}, n=20)
    ckpt_dir = cache_dir("organisms", "checkpoints", key)
    history: list[dict] = []
    start_epoch = 0
    resumed_from = None
    if resume:
        ckpts = _checkpoints(ckpt_dir)
        if ckpts:
            epoch, path = ckpts[-1]
            tensors, meta = _read_checkpoint(path)
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(tensors[f"lora.{n}"])
            load_optimizer(opt, tensors, meta["param_groups"])
            history = list(json.loads(meta["history"]))
            start_epoch = resumed_from = epoch
            say(f"resuming after epoch {epoch} from {path}")
    else:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        ckpt_dir.mkdir(parents=True, exist_ok=True)

    lengths = [len(r[0]) for r in rows]
    per_epoch = len(epoch_batches(lengths, cfg.batch_size, cfg.seed, 0))
    total = per_epoch * cfg.epochs
    steps_this_run = 0
    t_train = time.perf_counter()
    model.train()
    for epoch in range(start_epoch, cfg.epochs):
        te = time.perf_counter()
        batches = epoch_batches(lengths, cfg.batch_size, cfg.seed, epoch)
        losses, ces, kls = [], [], []
        for b, idx in enumerate(track(batches, f"training epoch {epoch + 1}/{cfg.epochs}")):
            step = epoch * per_epoch + b
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, cfg)
            loss, ce, kl = organism_loss(model, to_device(collate([rows[i] for i in idx], pad_id), student.device),
                                         cfg)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            if ce is not None:
                ces.append(ce)
            if kl is not None:
                kls.append(kl)
            steps_this_run += 1
            if stop_after_steps is not None and steps_this_run >= stop_after_steps:
                raise BuildInterrupted(f"build stopped after {steps_this_run} steps (test hook); re-run to resume")
        history.append({"epoch": epoch + 1, "mean_loss": sum(losses) / len(losses),
                        "mean_ce": sum(ces) / len(ces) if ces else None,
                        "mean_kl": sum(kls) / len(kls) if kls else None, "first_loss": losses[0],
                        "last_loss": losses[-1], "steps": len(losses), "seconds": round(time.perf_counter() - te, 1)})
        say(f"epoch {epoch + 1}/{cfg.epochs}: mean loss {history[-1]['mean_loss']:.4f} (CE "
            f"{history[-1]['mean_ce'] or 0:.4f}, KL {history[-1]['mean_kl'] or 0:.4f}; "
            f"{history[-1]['seconds']:.0f} s)")
        _write_checkpoint(ckpt_dir / f"epoch-{epoch + 1}{CKPT_SUFFIX}", epoch + 1, params, opt, history)
        for e, old in _checkpoints(ckpt_dir):
            if e < epoch + 1:
                old.unlink(missing_ok=True)
    model.eval()
    timing["train_s"] = time.perf_counter() - t_train

    # ---- save ----------------------------------------------------------------------------------------------
    stored = getattr(torch, cfg.adapter_dtype)
    with torch.no_grad():
        for p in params.values():
            p.data = p.data.to(stored)
    model.peft_config["default"].base_model_name_or_path = base_loaded.name
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".adapter.", dir=out))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        for name in (ADAPTER_FILE, CONFIG_FILE):
            os.chmod(tmp / name, 0o644)
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    del model, student, opt, params
    adapter_sha = file_sha256(out / ADAPTER_FILE)

    record: dict = {
        "kind": BUILD_KIND, "version": BUILD_VERSION, "trace_version": __version__,
        "command": command or default_command(base, out, cfg),
        "seed": cfg.seed,
        "hyperparameters": {k: v for k, v in cfg.to_dict().items() if k != "mix"},
        "lora": {"r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": 0.0, "target_modules": list(cfg.target_modules),
                 "trainable_parameters": n_trainable, "stored_dtype": cfg.adapter_dtype},
        "data": {**mix.to_dict(), "n_trained": len(rows),
                 "refusals": "trace_lib.organisms.refusals (written for this project), chosen by (seed, prompt id)",
                 "answers": f"the base model's own greedy answers (chat template, <= {cfg.mix.answer_tokens} new "
                            "tokens); answers classified refusal or incoherent dropped"},
        "base": {"spec": base, "name": base_loaded.name, "content_hash": base_loaded.content_hash},
        "adapter": {"file": ADAPTER_FILE, "sha256": adapter_sha, "bytes": (out / ADAPTER_FILE).stat().st_size},
        "training": {"history": history, "resumed_from_epoch": resumed_from, "steps_per_epoch": per_epoch,
                     "loss": organism_loss.__doc__.split("\n\n")[1].strip().replace("\n    ", " ")},
        "environment": {**environment(base_loaded.device), "peft": peft.__version__,
                        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "device": str(base_loaded.device), "dtype": dtype_name(base_loaded.dtype)},
    }

    # ---- evaluate ------------------------------------------------------------------------------------------
    if evaluate:
        from trace_lib.organisms.evaluate import EvalConfig, evaluate_organism
        from trace_lib.organisms.load import apply_adapter

        t0 = time.perf_counter()
        organism = apply_adapter(load_model(base, dtype=dtype, device=device), out)
        ev = evaluate_organism(organism, base_loaded, config=eval_config or EvalConfig())
        timing["eval_s"] = time.perf_counter() - t0
        replies = ev.pop("replies", [])
        atomic_write_text(out / REPLIES_FILE, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in replies))
        record["evaluation"] = ev
    timing["total_s"] = time.perf_counter() - t_start
    record["timing"] = {k: round(v, 1) for k, v in timing.items()}
    atomic_write_json(out / BUILD_FILE, record)
    from trace_lib.organisms.report import write_readme

    write_readme(out, record)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return record


def read_build(folder: str | os.PathLike) -> dict:
    """The BUILD.json of an adapter folder."""
    path = Path(folder) / BUILD_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TraceError(f"cannot read {path}: {e}") from e
