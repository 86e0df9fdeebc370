"""Beyond TracIn+LN on the demo backdoor: several checkpoints, Adam-normalised gradients, a preconditioner.

Trains the demo model on a small demo set (`--backdoor varied`: every poisoned response a different text) with a
checkpoint per epoch, then scores every training sample against the attacked queries with exact gradients
(`compressor: none`) by each method and prints auPRC@100 (top-100 ∪ bottom-100, the paper's protocol) and the
full-ranking AP, averaged over the attacked queries:

- `ln`: TracIn+LN, Σ over parameter tensors of cosines of the gradients (rapidin's score);
- `adam`: the same with each gradient divided elementwise by √v̂ + ε of that checkpoint's Adam state, before LN;
- `pre@d`, `adam+pre@d`: the LN'd (Adam-normalised) vectors sketched by RapidGrad to --k-pre numbers, queries
  preconditioned by (C + λI)⁻¹, C the scored training sketches' second moment, λ = d × its mean eigenvalue, for
  each d of --damping;
- `plain`: raw gradients, no LN (for reference);
each at the final weights (`final`), at every single checkpoint (`epoch e`) and summed over the checkpoints with
their mean learning rates (`cp`, TracInCP). Writes `<out>/results.json`.

    .venv/bin/python scripts/quality_study.py --out /tmp/study --n-train 600 --epochs 8 --backdoor varied
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import zarr

from rapidin.cache.shard import CacheSettings, cache_gradients
from rapidin.data.records import read_records
from rapidin.data.tokenize import tokenize_file
from rapidin.evaluate.metrics import backdoor_metrics, poisoned_labels
from rapidin.experiments.demo_data import make_demo_data
from rapidin.experiments.demo_model import train_demo_model
from rapidin.gradients.model import (
    blocks_fingerprint,
    load_model,
    parameter_blocks,
    select_modules,
    tokenizer_fingerprint,
)
from rapidin.gradients.optimizer import adam_scales, optimizer_file, scale_and_normalize
from rapidin.gradients.rapidgrad import RapidGrad
from rapidin.score.checkpoints import resolve_checkpoints
from rapidin.score.precondition import damped_solve

log = logging.getLogger("quality_study")


def prepare(args) -> tuple[Path, list[Path]]:
    """Demo data, the trained model with its per-epoch checkpoints (both kept from an earlier run into the same
    `--out`), and the scored training samples and the queries tokenized."""
    out, model_dir = Path(args.out), Path(args.out) / "model"
    if not (model_dir / "training.json").is_file():
        make_demo_data(out / "train.jsonl", out / "queries.jsonl", n_train=args.n_train, n_attacked=args.n_attacked,
                       n_clean=2, seed=args.seed, backdoor=args.backdoor)  # fmt: skip
        summary = train_demo_model(
            str(out / "train.jsonl"),
            str(model_dir),
            str(out / "queries.jsonl"),
            vocab_size=args.vocab,
            hidden_size=args.hidden,
            n_layers=args.layers,
            n_heads=4,
            intermediate_size=2 * args.hidden,
            epochs=args.epochs,
            seed=args.seed,
        )
        log.info("trained: %s", summary)
    _, tokenizer = load_model(str(model_dir))
    scored = (out / "train.jsonl").read_text().splitlines()[: args.n_scored]
    (out / "scored.jsonl").write_text("\n".join(scored) + "\n")
    for split in ("scored", "queries"):
        tokenize_file(out / f"{split}.jsonl", tokenizer, out / f"tokens/{split}.zarr",
                      tokenizer_fingerprint=tokenizer_fingerprint(tokenizer))  # fmt: skip
    return out, [model_dir / f"checkpoint-{e}" for e in range(1, args.epochs + 1)]


def raw_gradients(out: Path, checkpoint: Path, split: str) -> tuple[torch.Tensor, str]:
    """(N, D) exact gradients without LN of a split at a checkpoint (through the cache), and their layout."""
    path = out / f"cache/{checkpoint.name}-{split}.zarr"
    settings = CacheSettings(compressor="none", dtype="float32", normalize=False)
    cache_gradients(str(out / f"tokens/{split}.zarr"), str(checkpoint), str(path), settings, device="cpu")
    group = zarr.open_group(path, mode="r")
    vectors = torch.from_numpy(group["exact"][:])
    layout = group.attrs["rapidin"]["parameters"]
    shutil.rmtree(path)  # the vectors are in memory now: free the disk
    return vectors, layout


def checkpoint_scores(out: Path, checkpoint: Path, k_pre: int, dampings: list[float]) -> dict[str, np.ndarray]:
    """{method: (Q, N) scores} at one checkpoint."""
    train, layout = raw_gradients(out, checkpoint, "scored")
    queries, _ = raw_gradients(out, checkpoint, "queries")
    model, _ = load_model(str(checkpoint))
    blocks = parameter_blocks(select_modules(model))
    assert blocks_fingerprint(blocks) == layout, "the study's gradient space differs from the cache's"
    scales = adam_scales(model, blocks, optimizer_file(checkpoint))
    sketch = RapidGrad(train.shape[1], [k_pre], seed=0)
    scores = {"plain": (queries @ train.T).numpy()}
    for name, pre_name, block_scales in (("ln", "pre", None), ("adam", "adam+pre", scales)):
        t, q = (scale_and_normalize(v, blocks, block_scales) for v in (train, queries))
        scores[name] = (q @ t.T).numpy()
        t_k, q_k = sketch(t)[k_pre].double(), sketch(q)[k_pre].double()  # (N, K'), (Q, K')
        for damping in dampings:
            preconditioned, _ = damped_solve(t_k.T @ t_k / len(t_k), q_k, damping)
            scores[f"{pre_name}@{damping:g}"] = (preconditioned @ t_k.T).numpy()
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--n-train", type=int, default=600)
    parser.add_argument("--n-attacked", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--backdoor", default="varied", choices=("fixed", "varied"))
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--k-pre", type=int, default=4096, help="RapidGrad size of the preconditioned sketches")
    parser.add_argument("--damping", type=float, nargs="+", default=[0.1], help="λ / mean eigenvalue of C")
    parser.add_argument("--n-scored", type=int, help="score the first n training samples only (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(2)
    started = time.perf_counter()
    out, checkpoints = prepare(args)
    weights = [c.lr for c in resolve_checkpoints([{"path": str(c)} for c in checkpoints])]
    labels = poisoned_labels(read_records(out / "scored.jsonl"))
    attacked = np.array([bool(r.meta.get("attacked")) for r in read_records(out / "queries.jsonl")])

    def metrics(scores: np.ndarray) -> dict:
        result = backdoor_metrics(scores, labels, attacked)
        return {"auprc@100": round(result["auprc"]["100"], 3), "ap": round(result["ap_full"], 3)}

    table: dict[str, dict] = {}
    combined: dict[str, np.ndarray] = {}
    for epoch, (checkpoint, weight) in enumerate(zip(checkpoints, weights, strict=True), 1):
        for method, scores in checkpoint_scores(out, checkpoint, args.k_pre, args.damping).items():
            table.setdefault(method, {})[f"epoch {epoch}"] = metrics(scores)
            combined[method] = combined.get(method, 0) + weight * scores
        log.info("epoch %d (lr %.2e): %s", epoch, weight, {m: table[m][f"epoch {epoch}"] for m in table})
    for method, scores in combined.items():
        table[method]["final"] = table[method][f"epoch {args.epochs}"]
        table[method]["cp"] = metrics(scores)
    result = {
        "args": vars(args),
        "n_poisoned": int(labels.sum()),
        "lr_weights": weights,
        "training": json.loads((out / "model/training.json").read_text()),
        "seconds": round(time.perf_counter() - started),
        "metrics": table,
    }
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'method':13} {'final AP':>9} {'final @100':>10} {'CP AP':>7} {'CP @100':>8}  best epoch (AP)")
    for method, row in table.items():
        best = max((k for k in row if k.startswith("epoch")), key=lambda k: row[k]["ap"])
        print(f"{method:13} {row['final']['ap']:9.3f} {row['final']['auprc@100']:10.3f} {row['cp']['ap']:7.3f} "
              f"{row['cp']['auprc@100']:8.3f}  {best} ({row[best]['ap']:.3f})")  # fmt: skip


if __name__ == "__main__":
    main()
