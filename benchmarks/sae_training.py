"""SAE training speed: the production config, the fast implementation against the dense reference.

Usage: python benchmarks/sae_training.py [--tokens 100000] [--repeats 3] [--hook blocks.15.hook_resid_post]
                                         [--synthetic] [--threads N] [--architecture default|topk] [--epochs 1]

Trains ``trace_lib.sae.store.default_training_config()`` (ReLU, d_sae = 4 x d_in, L1 steered to L0 58,
decoder refit, batch 1024, lr 2e-3), or with ``--architecture topk`` the TopK config trace used before
(k=64, same width, batch and lr), for one epoch (or `--epochs`) with ``train_sae(..., implementation="fast")`` and
``implementation="reference"`` (plain dense autograd and single-tensor Adam: the code before the speed work).
Activations are real SmolLM2 residuals
from ``~/.cache/trace-lib/activations/*/shard-*.safetensors`` when they exist (massive-activation tokens
dropped, as ``get_or_train_saes`` does), else synthetic ones with matching shape and rough statistics (a
sparse sum of dictionary directions, a non-zero mean and a few high-variance dimensions).

Each run is a fresh subprocess (so peak RSS is per run); runs alternate between the implementations so that
drift in machine load hits both alike, and medians over ``--repeats`` are reported. Prints one JSON line:
``train_tokens_per_s`` (training steps only, from the callback clock), ``end_to_end_tokens_per_s`` (the
whole ``train_sae`` call, including scaling and the geometric-median initialisation), ``cpu_s`` (process
CPU time, less sensitive to other processes than wall time), ``peak_rss_mb``, the final losses, and the
fast/reference ratios.
"""

from __future__ import annotations

import argparse
import glob
import json
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

from trace_lib.sae import SAETrainingConfig, train_sae
from trace_lib.sae.store import default_training_config, drop_massive_activations

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


def worker(data_path: str, implementation: str, threads: int | None, architecture: str, epochs: int) -> None:
    if threads:
        torch.set_num_threads(threads)
    x = load_file(data_path)["x"]
    cfg = bench_config(architecture, epochs)
    stamps: list[float] = []
    cpu0, t0 = time.process_time(), time.perf_counter()
    _, log = train_sae(x, cfg, "bench", progress=False, implementation=implementation,
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
        "dead_fraction": log["dead_fraction"],
        "threads": torch.get_num_threads(),
    }))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hook", default="blocks.15.hook_resid_post")
    ap.add_argument("--synthetic", action="store_true", help="ignore cached real activations")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--implementations", default="fast,reference")
    ap.add_argument("--architecture", choices=("default", "topk"), default="default")
    ap.add_argument("--epochs", type=int, default=1, help="passes over the data (the audit trains 6)")
    ap.add_argument("--worker", nargs=2, metavar=("DATA", "IMPL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker[0], args.worker[1], args.threads, args.architecture, args.epochs)
        return

    got = None if args.synthetic else real_activations(args.hook, args.tokens)
    if got is None:
        x, source = synthetic_activations(args.tokens), "synthetic"
    else:
        x, source = got
    impls = args.implementations.split(",")
    runs: dict[str, list[dict]] = {i: [] for i in impls}
    with tempfile.TemporaryDirectory() as tmp:
        data_path = str(Path(tmp) / "x.safetensors")
        save_file({"x": x}, data_path)
        for r in range(args.repeats):
            for impl in impls if r % 2 == 0 else impls[::-1]:
                cmd = [sys.executable, __file__, "--worker", data_path, impl, "--architecture", args.architecture,
                       "--epochs", str(args.epochs)]
                if args.threads:
                    cmd += ["--threads", str(args.threads)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                runs[impl].append(json.loads(out.strip().splitlines()[-1]))
                print(f"# {impl}: {runs[impl][-1]['train_tokens_per_s']:.0f} tokens/s (training steps), "
                      f"{runs[impl][-1]['seconds']:.1f} s", file=sys.stderr)

    def summary(rs: list[dict]) -> dict:
        med = {k: statistics.median(r[k] for r in rs) for k in (
            "train_tokens_per_s", "end_to_end_tokens_per_s", "seconds", "train_seconds", "cpu_s", "peak_rss_mb")}
        return {**{k: round(v, 3) for k, v in med.items()},
                "train_tokens_per_s_runs": [round(r["train_tokens_per_s"]) for r in rs],
                "final_mse": rs[0]["final_mse"], "final_explained_variance": rs[0]["final_explained_variance"],
                "dead_fraction": rs[0]["dead_fraction"], "steps": rs[0]["steps"], "threads": rs[0]["threads"]}

    cfg = bench_config(args.architecture, args.epochs)
    record = {"benchmark": "sae_training", "data": source, "tokens": int(x.shape[0]), "d_in": int(x.shape[1]),
              "repeats": args.repeats, "config": {k: v for k, v in cfg.to_dict().items() if v is not None},
              **{impl: summary(rs) for impl, rs in runs.items()}, **machine()}
    if "fast" in runs and "reference" in runs:
        f, ref = record["fast"], record["reference"]
        record["speedup_train_tokens_per_s"] = round(f["train_tokens_per_s"] / ref["train_tokens_per_s"], 2)
        record["speedup_end_to_end"] = round(f["end_to_end_tokens_per_s"] / ref["end_to_end_tokens_per_s"], 2)
        record["cpu_time_ratio"] = round(ref["cpu_s"] / f["cpu_s"], 2)
    emit(record)


if __name__ == "__main__":
    main()
