"""SAE training speed: the production config, the fast implementation against the dense reference, and
SAELens's own trainer as an outside anchor.

Usage: python benchmarks/sae_training.py [--tokens 100000] [--eval-tokens 10000] [--repeats 3] [--epochs 1]
                                         [--hook blocks.15.hook_resid_post] [--synthetic] [--threads N]
                                         [--architecture default|topk] [--no-anchor] [--saelens-l1 2,4,8]
e.g. ``python benchmarks/sae_training.py --repeats 1 --epochs 3`` (the anchor needs ``pip install -c
constraints.txt sae-lens==6.54.12``, the ``anchor`` extra; without it the script says so and exits 2 unless
``--no-anchor``); a quick check: ``--tokens 20000 --eval-tokens 5000 --repeats 1 --threads 1``.

Trains ``trace_lib.sae.store.default_training_config()`` (ReLU, d_sae = 4 x d_in, L1 steered to L0 58,
decoder refit, batch 1024, lr 2e-3), or with ``--architecture topk`` the TopK config trace used before
(k=64, same width, batch and lr), for one epoch (or `--epochs`) with ``train_sae(..., implementation="fast")`` and
``implementation="reference"`` (plain dense autograd and single-tensor Adam: the code before the speed work).
Activations are real SmolLM2 residuals
from ``~/.cache/trace-lib/activations/*/shard-*.safetensors`` when they exist (massive-activation tokens
dropped, as ``get_or_train_saes`` does), else synthetic ones with matching shape and rough statistics (a
sparse sum of dictionary directions, a non-zero mean and a few high-variance dimensions). ``--tokens`` rows
are trained on; the next ``--eval-tokens`` rows are held out, and every run's SAE is measured on them with
trace's ``evaluate_sae`` (``heldout_explained_variance``, ``heldout_l0``, ...).

The anchor (default ReLU config only; ``--no-anchor`` skips it): SAELens 6.54.12's ``SAETrainer`` (its own
training loop, Adam, grad-norm clip 1.0 and LR/L1 schedulers) on a ``StandardTrainingSAE`` (ReLU, L1 penalty
``c * sum_i z_i ||W_dec,i||`` averaged over the batch: the same form as trace's), fed the same tensor in
trace's batch order (same seeded per-epoch permutation, same batch size, same number of tokens), with the same
d_sae, lr, Adam betas, LR warm-up / linear decay to 0 over the last 20% and L1 warm-up lengths as trace's
schedule, inputs scaled to mean norm sqrt(d_in) by SAELens's ``ActivationScaler`` (estimated on the training
rows before ``fit()``, outside the timing, as trace's estimate is), no wandb, no checkpoints. What stays
SAELens's own: its weight init (decoder rows at norm 0.1, ``b_dec = 0``), no decoder-norm constraint, a fixed
L1 coefficient (no L0 controller), no dead-latent resampling, no decoder refit. Its SAE is saved with
``save_inference_model`` (scaling folded in) and read back with trace's SAELens loader ``load_sae`` for the
held-out evaluation, so both are measured by the same code on the same rows. Training tokens/s is timed the
same way for both: from the end of the first step to the end of the last (trace's ``callback``; a
``SAETrainer`` subclass whose ``step`` stamps the clock), in fresh processes on the same thread count.

The L1 coefficient: SAELens has no L0 target, so the anchor tries each coefficient of ``--saelens-l1`` once
(in the first repeat) and keeps the one whose held-out L0 is closest (in log ratio) to trace's; the later
repeats use that one, and ``anchor.l1_sweep`` lists them all. The default 2,4,8 comes from a sweep on 20k real
layer-15 tokens with held-out L0 (trace's, steered: 725 after 1 epoch, 96 after 3, 55 after 6 with its
coefficient ending at 2.1, EV 0.763): after 3 epochs SAELens gave L0 412 / 307 / 266 at 1 / 2 / 3, after 6
epochs L0 140 / 88 / 53 (EV 0.716 / 0.637 / 0.460) at 2 / 4 / 8. At a fixed coefficient SAELens's L0 falls more
slowly than trace's, so the coefficient that matches L0 58 depends on the run's length; longer runs (the
production one is about 520 steps, the sweep's 120) are expected to need a lower one, hence 2 and 4 beside 8
(not measured: check ``anchor.l1_sweep``, and widen ``--saelens-l1`` if trace's L0 falls outside it). Pass one
value to skip the sweep.

Each run is a fresh subprocess (so peak RSS is per run); runs alternate between the implementations so that
drift in machine load hits both alike, and medians over ``--repeats`` are reported. Prints one JSON line:
``train_tokens_per_s`` (training steps only, from the callback clock), ``end_to_end_tokens_per_s`` (the
whole ``train_sae`` call, including scaling and the geometric-median initialisation; for SAELens, building
the SAE and trainer, the scale estimate and ``fit()``), ``cpu_s`` (process
CPU time, less sensitive to other processes than wall time), ``peak_rss_mb``, the final losses, the held-out
quality, the fast/reference ratios and, under ``anchor``, the trace/SAELens ratios (``trace`` names the trace
run compared: the first of ``--implementations``). A ``# anchor:`` line on stderr sums it up.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import emit, machine
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from trace_lib.sae import SAETrainingConfig, evaluate_sae, load_sae, train_sae
from trace_lib.sae.store import default_training_config, drop_massive_activations
from trace_lib.sae.training.config import DEFAULT_DEAD_WINDOW
from trace_lib.sae.training.schedule import Schedule

SHARDS = "~/.cache/trace-lib/activations/*/shard-*.safetensors"


def real_activations(hook: str, tokens: int) -> tuple[torch.Tensor, str] | None:
    parts, rows, folders = [], 0, set()
    for path in sorted(glob.glob(os.path.expanduser(SHARDS))):
        with safe_open(path, framework="pt") as f:
            if hook not in f.keys():  # noqa: SIM118
                continue
            parts.append(f.get_tensor(hook).float())
        folders.add(Path(path).parent.name)
        rows += parts[-1].shape[0]
        if rows >= tokens:
            break
    if not parts:
        return None
    x, dropped = drop_massive_activations(torch.cat(parts)[:tokens])
    return x.contiguous(), f"real:{hook} ({','.join(sorted(folders))}, {dropped} massive-activation tokens dropped)"


def synthetic_activations(tokens: int, d_in: int = 576, seed: int = 0) -> torch.Tensor:
    """Sparse codes over a random dictionary (32 of 8192 active, heavy-tailed magnitudes) + noise, plus a
    shared offset and a few high-variance dimensions, like transformer residual streams."""
    g = torch.Generator().manual_seed(seed)
    n_feat, active = 8192, 32
    dictionary = torch.randn(n_feat, d_in, generator=g)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    x = torch.empty(tokens, d_in)
    for i in range(0, tokens, 8192):  # in blocks, to keep memory flat
        n = min(8192, tokens - i)
        idx = torch.randint(0, n_feat, (n, active), generator=g)
        mags = torch.distributions.Exponential(1.0).sample((n, active)) * 3.0
        x[i : i + n] = torch.nn.functional.embedding_bag(idx, dictionary, per_sample_weights=mags, mode="sum")
    x += 0.3 * torch.randn(tokens, d_in, generator=g)
    x += torch.randn(d_in, generator=g)  # offset
    x[:, :4] *= 20.0  # a few large-variance dimensions
    return x


def bench_config(architecture: str, epochs: int = 1) -> SAETrainingConfig:
    """``epochs`` of the production config, or of the TopK config it replaced (``topk``)."""
    if architecture == "topk":
        cfg = SAETrainingConfig(architecture="topk", expansion_factor=4, k=64, batch_size=1024, lr=2e-3)
    else:
        cfg = default_training_config()
    cfg.epochs = epochs
    cfg.device = "cpu"
    return cfg


HELDOUT_KEYS = ("heldout_explained_variance", "heldout_mse", "heldout_l0", "heldout_dead_fraction")
ANCHOR = "saelens"  # the run name of SAELens's trainer
SAELENS_VERSION = "6.54.12"  # the version the anchor was written against (constraints.txt)
SAELENS_L1 = "2,4,8"  # the anchor's L1 coefficients, tried once each (see the module docstring)


def heldout(sae, data: dict[str, torch.Tensor]) -> dict:
    """trace's ``evaluate_sae`` of ``sae`` (raw units) on the held-out rows, if the data file has any."""
    if "x_eval" not in data:
        return {}
    q = evaluate_sae(sae, data["x_eval"])
    return {"heldout_explained_variance": q["explained_variance"], "heldout_mse": q["mse"],
            "heldout_l0": q["l0"], "heldout_dead_fraction": q["dead_fraction"]}


def worker(data_path: str, implementation: str, threads: int | None, architecture: str, epochs: int) -> None:
    if threads:
        torch.set_num_threads(threads)
    data = load_file(data_path)
    x = data["x"]
    cfg = bench_config(architecture, epochs)
    stamps: list[float] = []
    cpu0, t0 = time.process_time(), time.perf_counter()
    sae, log = train_sae(x, cfg, "bench", progress=False, implementation=implementation,
                         callback=lambda step, losses: stamps.append(time.perf_counter()))
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    steps = len(stamps)
    loop = stamps[-1] - stamps[0] if steps > 1 else float("nan")
    tokens_per_step = cfg.batch_size
    print(json.dumps({
        "implementation": implementation,
        "seconds": wall,
        "cpu_s": cpu,
        "train_seconds": loop,
        "train_tokens_per_s": (steps - 1) * tokens_per_step / loop if steps > 1 else float("nan"),
        "end_to_end_tokens_per_s": log["tokens"] / wall,
        "steps": log["steps"],
        "tokens": log["tokens"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "final_mse": log["final_mse"],
        "final_explained_variance": log["final_explained_variance"],
        "final_l0_mean": log.get("final_l0_mean"),
        "final_l1_coefficient": log.get("final_l1_coefficient"),
        "dead_fraction": log["dead_fraction"],
        "threads": torch.get_num_threads(),
        **heldout(sae, data),
    }))


def saelens_worker(data_path: str, threads: int | None, epochs: int, l1_coefficient: float) -> None:
    """SAELens's own ``SAETrainer`` on a ``StandardTrainingSAE`` (ReLU, decoder-norm-weighted L1), fed the same
    tensor in the same batches as trace; prints the same JSON fields as :func:`worker`."""
    if threads:
        torch.set_num_threads(threads)
    from sae_lens import LoggingConfig, SAETrainer, StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens import __version__ as sae_lens_version
    from sae_lens.config import SAETrainerConfig

    data = load_file(data_path)
    x = data["x"]
    cfg = bench_config("default", epochs)
    n, d_in = x.shape
    bs = cfg.batch_size
    steps_per_epoch = math.ceil(n / bs)
    total_steps = epochs * steps_per_epoch  # what train_sae takes on a tensor
    schedule = Schedule(cfg, total_steps)  # trace's warm-up and decay lengths, so both follow the same schedule
    dead_window_tokens = cfg.dead_feature_window or min(DEFAULT_DEAD_WINDOW, max(bs, total_steps * bs // 10))

    def batches():
        """trace's batch order: one seeded randperm per epoch, ``bs`` rows at a time (the last batch shorter)."""
        gen = torch.Generator().manual_seed(cfg.seed + 1_000_003)
        for _ in range(epochs):
            perm = torch.randperm(n, generator=gen)
            for i in range(0, n, bs):
                yield x[perm[i : i + bs]]

    stamps: list[float] = []

    class TimedTrainer(SAETrainer):
        """SAELens's trainer, stamping the clock after each step (as trace's callback does)."""

        last = None

        def step(self, batch: torch.Tensor):
            out = super().step(batch)
            stamps.append(time.perf_counter())
            self.last = out
            return out

    cpu0, t0 = time.process_time(), time.perf_counter()
    torch.manual_seed(cfg.seed)  # SAELens's weight init draws from the global RNG
    sae = StandardTrainingSAE(StandardTrainingSAEConfig(
        d_in=d_in, d_sae=cfg.d_sae or cfg.expansion_factor * d_in, dtype="float32", device="cpu",
        apply_b_dec_to_input=cfg.apply_b_dec_to_input, normalize_activations="expected_average_only_in",
        l1_coefficient=l1_coefficient, l1_warm_up_steps=schedule.sparsity_warmup))
    trainer_cfg = SAETrainerConfig(
        total_training_samples=epochs * n, train_batch_size_samples=bs, lr=cfg.lr, lr_end=cfg.lr,
        lr_scheduler_name="constant", lr_warm_up_steps=schedule.warmup, lr_decay_steps=schedule.decay_steps,
        adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, device="cpu", autocast=False,
        dead_feature_window=max(1, dead_window_tokens // bs), feature_sampling_window=max(1, total_steps),
        n_checkpoints=0, checkpoint_path=None, save_final_checkpoint=False,
        logger=LoggingConfig(log_to_wandb=False), n_batches_for_norm_estimate=steps_per_epoch)
    trainer = TimedTrainer(cfg=trainer_cfg, sae=sae, data_provider=batches())
    # sqrt(d_in) / mean ||x|| over the training rows, as trace estimates it on a tensor (fit() skips its own)
    trainer.activation_scaler.estimate_scaling_factor(
        d_in, (x[i : i + bs] for i in range(0, n, bs)), n_batches_for_norm_estimate=steps_per_epoch)
    trainer.fit()  # folds the scaling factor into the weights at the end
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0

    steps = len(stamps)
    loop = stamps[-1] - stamps[0] if steps > 1 else float("nan")
    with torch.no_grad():
        out = trainer.last
        mse = (out.sae_out - out.sae_in).pow(2).sum(dim=-1).mean()
        var = (out.sae_in - out.sae_in.mean(dim=0)).pow(2).sum(dim=-1).mean()
        l0 = (out.feature_acts > 0).sum(dim=-1).float().mean()
    with tempfile.TemporaryDirectory() as tmp:
        sae.save_inference_model(tmp)  # a SAELens folder, read back with trace's SAELens loader
        trace_sae = load_sae(tmp, hook_name="bench")
    print(json.dumps({
        "implementation": ANCHOR,
        "sae_lens_version": sae_lens_version,
        "seconds": wall,
        "cpu_s": cpu,
        "train_seconds": loop,
        "train_tokens_per_s": (steps - 1) * bs / loop if steps > 1 else float("nan"),
        "end_to_end_tokens_per_s": trainer.n_training_samples / wall,
        "steps": trainer.n_training_steps,
        "tokens": trainer.n_training_samples,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "final_mse": mse.item(),
        "final_explained_variance": (1 - mse / var.clamp_min(1e-12)).item(),
        "final_l0_mean": l0.item(),
        "final_l1_coefficient": l1_coefficient,
        "dead_fraction": trainer.dead_neurons.float().mean().item(),
        "threads": torch.get_num_threads(),
        **heldout(trace_sae, data),
    }))


def l0_of(result: dict) -> float:
    """A run's mean L0: on the held-out rows, else on its last training batch."""
    return result.get("heldout_l0", result["final_l0_mean"])


def split(x: torch.Tensor, tokens: int, eval_tokens: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first ``tokens`` rows to train on and the next ``eval_tokens`` held out; when fewer rows exist, the
    held-out rows (at most a fifth of them) come off the end."""
    n = x.shape[0]
    n_eval = eval_tokens if n >= tokens + eval_tokens else min(eval_tokens, n // 5)
    n_train = min(tokens, n - n_eval)
    return x[:n_train].contiguous(), (x[n_train : n_train + n_eval].contiguous() if n_eval else None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=100_000, help="training rows")
    ap.add_argument("--eval-tokens", type=int, default=10_000,
                    help="held-out rows after the training rows, for evaluate_sae on every run's SAE (0: none)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hook", default="blocks.15.hook_resid_post")
    ap.add_argument("--synthetic", action="store_true", help="ignore cached real activations")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--implementations", default="fast,reference")
    ap.add_argument("--architecture", choices=("default", "topk"), default="default")
    ap.add_argument("--epochs", type=int, default=1, help="passes over the data (the audit trains 6)")
    ap.add_argument("--no-anchor", action="store_true", help="skip the SAELens anchor run")
    ap.add_argument("--saelens-l1", default=SAELENS_L1,
                    help="the anchor's L1 coefficient, or several (comma-separated): each is trained once and the one "
                         "whose held-out L0 is closest to trace's is the anchor (and repeated)")
    ap.add_argument("--worker", nargs=2, metavar=("DATA", "IMPL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        if args.worker[1] == ANCHOR:
            saelens_worker(args.worker[0], args.threads, args.epochs, float(args.saelens_l1))
        else:
            worker(args.worker[0], args.worker[1], args.threads, args.architecture, args.epochs)
        return

    anchor = not args.no_anchor
    if anchor and args.architecture != "default":
        print("# the SAELens anchor covers the default (ReLU) config only: skipped", file=sys.stderr)
        anchor = False
    if anchor and importlib.util.find_spec("sae_lens") is None:
        print(f"sae_lens is not installed: pip install -c constraints.txt sae-lens=={SAELENS_VERSION} "
              "(the `anchor` extra), or pass --no-anchor", file=sys.stderr)
        sys.exit(2)

    got = None if args.synthetic else real_activations(args.hook, args.tokens + args.eval_tokens)
    if got is None:
        x, source = synthetic_activations(args.tokens + args.eval_tokens), "synthetic"
    else:
        x, source = got
    x, x_eval = split(x, args.tokens, args.eval_tokens)
    impls = [i for i in args.implementations.split(",") if i] + ([ANCHOR] if anchor else [])
    l1s = [float(c) for c in str(args.saelens_l1).split(",")]
    ours = next((i for i in impls if i != ANCHOR), None)  # the trace run the anchor is compared with
    runs: dict[str, list[dict]] = {i: [] for i in impls}
    sweep: list[dict] = []  # the anchor's first repeat: one run per L1 coefficient
    env = {**os.environ, "TQDM_DISABLE": "1", "WANDB_MODE": "disabled"}  # SAELens: no progress bar, no network
    with tempfile.TemporaryDirectory() as tmp:
        data_path = str(Path(tmp) / "x.safetensors")
        save_file({"x": x, **({"x_eval": x_eval} if x_eval is not None else {})}, data_path)

        def run(impl: str, l1: float | None = None) -> dict:
            cmd = [sys.executable, __file__, "--worker", data_path, impl, "--architecture", args.architecture,
                   "--epochs", str(args.epochs)]
            if l1 is not None:
                cmd += ["--saelens-l1", repr(l1)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
            result = json.loads(out.strip().splitlines()[-1])
            name, sparsity = (impl, "") if l1 is None else (f"{impl} (L1 {l1:g})", f", L0 {l0_of(result):.1f}")
            print(f"# {name}: {result['train_tokens_per_s']:.0f} tokens/s (training steps), "
                  f"{result['seconds']:.1f} s{sparsity}", file=sys.stderr)
            return result

        chosen: float | None = None
        for r in range(args.repeats):
            for impl in impls if r % 2 == 0 else impls[::-1]:  # the anchor runs last in the first repeat
                if impl != ANCHOR:
                    runs[impl].append(run(impl))
                    continue
                if chosen is None:
                    sweep = [run(ANCHOR, c) for c in l1s]
                    target = l0_of(runs[ours][0]) if ours else None
                    best = min(sweep, key=lambda s: abs(math.log(l0_of(s) / target))) if target else sweep[0]
                    chosen = best["final_l1_coefficient"]
                    runs[ANCHOR].append(best)
                else:
                    runs[ANCHOR].append(run(ANCHOR, chosen))

    def summary(rs: list[dict]) -> dict:
        med = {k: statistics.median(r[k] for r in rs) for k in (
            "train_tokens_per_s", "end_to_end_tokens_per_s", "seconds", "train_seconds", "cpu_s", "peak_rss_mb")}
        extra = ("final_l0_mean", "final_l1_coefficient", "sae_lens_version", *HELDOUT_KEYS)
        return {**{k: round(v, 3) for k, v in med.items()},
                "train_tokens_per_s_runs": [round(r["train_tokens_per_s"]) for r in rs],
                "final_mse": rs[0]["final_mse"], "final_explained_variance": rs[0]["final_explained_variance"],
                "dead_fraction": rs[0]["dead_fraction"], "steps": rs[0]["steps"], "threads": rs[0]["threads"],
                **{k: rs[0][k] for k in extra if rs[0].get(k) is not None}}

    cfg = bench_config(args.architecture, args.epochs)
    record = {"benchmark": "sae_training", "data": source, "tokens": int(x.shape[0]), "d_in": int(x.shape[1]),
              "eval_tokens": int(x_eval.shape[0]) if x_eval is not None else 0,
              "repeats": args.repeats, "config": {k: v for k, v in cfg.to_dict().items() if v is not None},
              **{impl: summary(rs) for impl, rs in runs.items()}, **machine()}
    if "fast" in runs and "reference" in runs:
        f, ref = record["fast"], record["reference"]
        record["speedup_train_tokens_per_s"] = round(f["train_tokens_per_s"] / ref["train_tokens_per_s"], 2)
        record["speedup_end_to_end"] = round(f["end_to_end_tokens_per_s"] / ref["end_to_end_tokens_per_s"], 2)
        record["cpu_time_ratio"] = round(ref["cpu_s"] / f["cpu_s"], 2)
    if anchor and ours is not None:
        t, s = record[ours], record[ANCHOR]
        record["anchor"] = {
            "trace": ours, "sae_lens_version": s.get("sae_lens_version"), "l1_coefficient": chosen,
            "trace_over_saelens_train_tokens_per_s": round(t["train_tokens_per_s"] / s["train_tokens_per_s"], 2),
            "trace_over_saelens_end_to_end": round(t["end_to_end_tokens_per_s"] / s["end_to_end_tokens_per_s"], 2),
            "l1_sweep": [{"l1_coefficient": r["final_l1_coefficient"], "l0": l0_of(r),
                          "explained_variance": r.get("heldout_explained_variance", r["final_explained_variance"]),
                          "train_tokens_per_s": round(r["train_tokens_per_s"])} for r in sweep],
        }

        def quality(r: dict) -> str:
            if "heldout_l0" in r:
                return f"EV {r['heldout_explained_variance']:.4f}, L0 {r['heldout_l0']:.1f} (held-out)"
            return f"EV {r['final_explained_variance']:.4f}, L0 {r['final_l0_mean']:.1f} (last batch)"

        print(f"# anchor (SAELens {s.get('sae_lens_version')}, L1 {chosen:g}): training tokens/s trace {ours} "
              f"{t['train_tokens_per_s']:.0f} vs SAELens {s['train_tokens_per_s']:.0f} = "
              f"{record['anchor']['trace_over_saelens_train_tokens_per_s']:.2f}x; trace {quality(t)}; "
              f"SAELens {quality(s)}", file=sys.stderr)
    emit(record)


if __name__ == "__main__":
    main()
