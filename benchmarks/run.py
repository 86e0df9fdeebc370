"""`make bench`: caching and scoring benchmarks side by side, as a table, then machine-readable lines.

    python benchmarks/run.py [--device cuda] [--threads N] [--json results.json] [--caching-… / --scoring-… /
        --scale-… sizes]

The last lines are `caching_vs_bare_fwd_bwd <ratio>` (goal ≤ 1.25), `scoring_vs_inmemory_gemm <ratio>`
(throughput ratio, goal ≥ 0.7), `scoring_vs_per_sample_loop <ratio>` (speed-up, goal ≥ 100),
`stream_vs_cache_time <ratio>` (on-the-fly scoring ÷ caching, same shard, goal ≤ 1.1) and
`scoring_linearity <x>` (largest relative deviation of scoring's time per row over the N sweep, goal ≤ 0.1).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import tempfile
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would interleave with the table

import accuracy
import caching
import scale
import scoring
import torch


def size_arguments(parser: argparse.ArgumentParser, size_class, prefix: str) -> None:
    for field in dataclasses.fields(size_class):
        parser.add_argument(f"--{prefix}-{field.name.replace('_', '-')}", type=int, default=field.default)


def sized(args, size_class, prefix: str):
    return size_class(**{f.name: getattr(args, f"{prefix}_{f.name}") for f in dataclasses.fields(size_class)})


def machine() -> str:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, {gpu}"


def print_table(caching_result: dict, scoring_result: dict, accuracy_result: dict, scale_result: dict) -> None:
    c, s, a, x = caching_result, scoring_result, accuracy_result, scale_result
    print(f"machine: {machine()}, {torch.get_num_threads()} torch threads; load average {os.getloadavg()[0]:.1f}")
    model = f"Llama, {c['params'] / 1e6:.1f}M parameters (D = {c['D'] / 1e6:.1f}M)"
    print(f"\ncaching: {model}, {c['n_samples']} samples, {c['n_tokens']} tokens")
    print(f"{'method':<66} {'seconds':>9} {'tokens/s':>9}")
    for name, seconds in c["seconds"].items():
        print(f"{name:<66} {seconds:>9.2f} {c['tokens_per_s'][name]:>9.0f}")
    print(f"\nscoring: N = {s['n']} rows × K = {s['k']} (float16, {s['cache_gb']:.2f} GB), {s['n_queries']} queries")
    print(f"{'method':<66} {'seconds':>9} {'GB/s':>9}")
    for name, seconds in s["seconds"].items():
        print(f"{name:<66} {seconds:>9.3f} {s['cache_gb_per_s'][name]:>9.2f}")
    print(f"\nscoring scale-up (score_shard in a fresh process)\n{'rows':>8} {'seconds':>9} {'peak RSS MiB':>13}")
    for n, (seconds, peak) in s["scaling"].items():
        print(f"{n:>8} {seconds:>9.3f} {peak / 2**20:>13.0f}")
    print(f"\naccuracy against exact scores (D = {a['D']}, 4 queries × 40 samples)")
    print(f"{'compressor':<66} {'numbers':>9} {'|error|':>9} {'Spearman':>9}")
    for name, row in a["rows"].items():
        print(f"{name:<66} {row['numbers']:>9} {row['error']:>9.3f} {row['spearman']:>9.3f}")
    print(f"\nscale: score_shard over N rows × K = {x['k']} (float16), {x['n_queries']} queries, fresh processes")
    print(f"{'rows':>8} {'seconds':>9} {'µs/row':>9} {'peak RSS MiB':>13}")
    for n, (seconds, peak) in x["scoring"].items():
        print(f"{n:>8} {seconds:>9.3f} {seconds / n * 1e6:>9.3f} {peak / 2**20:>13.0f}")
    print(f"\nscale: caching and on-the-fly scoring of {x['n_queries']} queries, fresh processes")
    print(f"{'method':<40} {'samples':>8} {'seconds':>9} {'ms/sample':>10} {'peak RSS MiB':>13}")
    for method, timed in (("cache_gradients", x["caching"]), ("stream_scores (cache.store: false)", x["stream"])):
        for n, (seconds, peak) in timed.items():
            print(f"{method:<40} {n:>8} {seconds:>9.2f} {seconds / n * 1e3:>10.1f} {peak / 2**20:>13.0f}")
    print(f"\ncaching_vs_per_sample_loop {c['caching_vs_per_sample_loop']:.3f}")
    print(f"caching_vs_bare_fwd_bwd {c['caching_vs_bare_fwd_bwd']:.3f}")
    print(f"scoring_vs_inmemory_gemm {s['scoring_vs_inmemory_gemm']:.3f}")
    print(f"scoring_vs_per_sample_loop {s['scoring_vs_per_sample_loop']:.1f}")
    print(f"stream_vs_cache_time {x['stream_vs_cache_time']:.3f}")
    print(f"scoring_linearity {x['scoring_linearity']:.3f}")
    print(f"caching_linearity {x['caching_linearity']:.3f}")
    print(f"caching_memory_growth {x['caching_memory_growth']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (caching and scoring)")
    parser.add_argument("--model-dtype", default="float32", help="model math dtype for caching (auto: bf16 on GPU)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: all cores)")
    parser.add_argument("--json", help="also write the results here")
    size_arguments(parser, caching.CachingSize, "caching")
    size_arguments(parser, scoring.ScoringSize, "scoring")
    size_arguments(parser, scale.ScaleSize, "scale")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for the score_shard processes
    with tempfile.TemporaryDirectory(prefix="rapidin-bench-") as root:
        (Path(root) / "caching").mkdir()
        (Path(root) / "scoring").mkdir()
        caching_size, scoring_size = (
            sized(args, caching.CachingSize, "caching"),
            sized(args, scoring.ScoringSize, "scoring"),
        )
        caching_result = caching.run(Path(root) / "caching", caching_size, args.device, args.model_dtype)
        scoring_result = scoring.run(Path(root) / "scoring", scoring_size, args.device)
        (Path(root) / "scale").mkdir()
        scale_size = sized(args, scale.ScaleSize, "scale")
        scale_result = scale.run(Path(root) / "scale", scale_size, caching_size, args.device, args.model_dtype)
    accuracy_result = accuracy.run()
    if args.json:
        results = {
            "machine": machine(),
            "caching": caching_result,
            "scoring": scoring_result,
            "accuracy": accuracy_result,
            "scale": scale_result,
        }
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    print_table(caching_result, scoring_result, accuracy_result, scale_result)


if __name__ == "__main__":
    main()
