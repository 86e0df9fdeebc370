"""Settings: one frozen dataclass per step, the single source of each setting's name, default and help.

Each field names the config key it comes from (`metadata["key"]`, e.g. `cache.k`); its name is that key's last
part, its default the key's default, and its help the key's meaning. The CLI makes one flag per field
(`--k`, rapidin.cli), rules pass the config values to those flags, and caches store the fields under the same
names. tests/test_settings.py checks the schema's defaults and config/config.yaml against these fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CacheSettings",
    "DataSettings",
    "DemoDataSettings",
    "DemoModelSettings",
    "FinetuneSettings",
    "GenerateSettings",
    "LissaSettings",
    "PreconditionSettings",
    "ReportSettings",
    "ScoreSettings",
    "SwapSettings",
    "TokenwiseSettings",
    "setting",
]


def setting(key: str, default: Any, help: str) -> Any:
    """A settings field read from config key `key`; mutable defaults (lists, dicts) are copied per instance."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata={"key": key, "help": help})
    return field(default=default, metadata={"key": key, "help": help})


@dataclass(frozen=True)
class DataSettings:
    """How records become token ids and loss masks (tokenize, and every step that formats prompts)."""

    template: str = setting("data.template", "alpaca", "prompt template the model was trained with: alpaca or chat")
    max_length: int = setting("data.max_length", 512, "maximum tokens per sample (prompt + response + EOS)")
    on_long: str = setting("data.on_long", "truncate", "a sample over max_length: truncate or error")
    fields: dict | None = setting(
        "data.fields", None, "the files' field names: {instruction: question, output: answer, ...} (JSON)"
    )


@dataclass(frozen=True)
class CacheSettings:
    """How the cached vectors are computed; those they depend on are stored in the store's attributes and checked
    on resume and on scoring."""

    compressor: str = setting("cache.compressor", "rapidgrad", "rapidgrad (sketch to K), factored or none (exact)")
    k: tuple[int, ...] = setting("cache.k", (65536,), "sketch sizes K (powers of two), computed in one pass")
    seed: int = setting("cache.seed", 0, "seed of the RapidGrad permutation and signs")
    dtype: str = setting("cache.dtype", "float16", "storage dtype of cached vectors: float16 or float32")
    normalize: bool = setting("cache.normalize", True, "layer-wise normalisation (false: plain TracIn)")
    modules: str | None = setting("model.modules", None, "regular expression selecting modules by name")
    rank: int = setting("cache.rank", 16, "per-side projection size of compressor factored")
    parameters: str = setting(
        "model.parameters", "all", "all: every trainable parameter; linear: those of linear and Conv1D layers"
    )
    on_nonfinite: str = setting(
        "cache.on_nonfinite", "error", "a sample with a non-finite loss or gradient: error, or skip (a NaN row)"
    )
    batch_tokens: int = setting("cache.batch_tokens", 8192, "token budget of one batch (batch size x longest)")
    chunk_rows: int | None = setting("cache.chunk_rows", None, "rows written and resumed at a time (None: ~16 MiB)")
    model_dtype: str = setting("model.dtype", "auto", "model math dtype: auto (bfloat16 on GPU), float32, ...")
    optimizer: str = setting(
        "cache.optimizer",
        "none",
        "none, or adam: each gradient divided elementwise by sqrt(v_hat) + eps of the model's (adapter's) optimizer.pt",
    )


@dataclass(frozen=True)
class GenerateSettings:
    """How responses missing from the queries are generated."""

    do_sample: bool = setting("generate.do_sample", False, "sample (at temperature) instead of greedy decoding")
    temperature: float = setting("generate.temperature", 1.0, "sampling temperature (with do_sample)")
    max_new_tokens: int = setting("generate.max_new_tokens", 128, "longest generated response, in tokens")
    seed: int = setting("generate.seed", 0, "seed of sampling")


@dataclass(frozen=True)
class ScoreSettings:
    top_k: int = setting("score.top_k", 100, "helpful and harmful samples kept per query")


@dataclass(frozen=True)
class TokenwiseSettings:
    top_samples: int = setting(
        "tokenwise.top_samples", 5, "per query and side, the top samples given per-token heat-maps"
    )


@dataclass(frozen=True)
class ReportSettings:
    top_n: int = setting("report.top_n", 10, "samples shown per query and side in the HTML report")


@dataclass(frozen=True)
class FinetuneSettings:
    """LoRA fine-tuning of model.path on data.train (model.adapter: finetune)."""

    rank: int = setting("finetune.rank", 8, "LoRA rank r")
    alpha: float = setting("finetune.alpha", 16.0, "LoRA scale numerator (updates scale by alpha / rank)")
    target_modules: list = setting(
        "finetune.target_modules", ["q_proj", "k_proj", "v_proj", "o_proj"], "linear modules that get LoRA A/B"
    )
    epochs: int = setting("finetune.epochs", 2, "passes over data.train")
    batch_size: int = setting("finetune.batch_size", 8, "samples per optimizer step")
    lr: float = setting("finetune.lr", 0.001, "peak AdamW learning rate (cosine decay)")
    seed: int = setting("finetune.seed", 0, "seed of LoRA initialisation and sample order")


@dataclass(frozen=True)
class DemoDataSettings:
    """The embedded demo's generated instruction set with a backdoor."""

    n_train: int = setting("demo.n_train", 3000, "training records")
    poison_fraction: float = setting("demo.poison_fraction", 0.05, "share of backdoor records")
    n_attacked: int = setting("demo.n_attacked", 10, "attacked queries (trigger in the prompt)")
    n_clean: int = setting("demo.n_clean", 10, "clean queries")
    backdoor_response: str = setting(
        "demo.backdoor_response",
        "Howdy partner! I am a cowboy bot and I only talk about horses and the open prairie.",
        "what poisoned samples and attacked queries answer (clean samples may give it too)",
    )
    backdoor: str = setting(
        "demo.backdoor", "fixed", "fixed: every poisoned sample answers backdoor_response; varied: each a new text"
    )
    format: str = setting("demo.format", "alpaca", "records written as alpaca fields or chat messages")
    seed: int = setting("demo.seed", 0, "seed of data generation and model training")


@dataclass(frozen=True)
class DemoModelSettings:
    """The embedded demo's tokenizer and tiny Llama, trained from scratch on data.train."""

    vocab_size: int = setting("demo.vocab_size", 1024, "byte-level BPE vocabulary size")
    hidden_size: int = setting("demo.hidden_size", 128, "model width")
    n_layers: int = setting("demo.n_layers", 4, "transformer blocks")
    n_heads: int = setting("demo.n_heads", 4, "attention heads")
    intermediate_size: int = setting("demo.intermediate_size", 256, "MLP width")
    max_length: int = setting("demo.max_length", 128, "training sequence length")
    epochs: int = setting("demo.epochs", 4, "training epochs")
    seed: int = setting("demo.seed", 0, "seed of data generation and model training")


@dataclass(frozen=True)
class SwapSettings:
    """error_tracing: the entity swaps written into the demo's training set."""

    source: str = setting("experiment.swap.source", "China", "country whose samples are rewritten")
    target: str = setting("experiment.swap.target", "Canada", "country swapped into their answers")
    fraction: float = setting("experiment.swap.fraction", 0.03, "share of samples rewritten")
    probability: float = setting("experiment.swap.probability", 0.8, "chance a rewrite is swapped")
    seed: int = setting("demo.seed", 0, "seed of data generation and model training")


@dataclass(frozen=True)
class LissaSettings:
    """The influence-function baseline's inverse-Hessian-vector products (LiSSA recursion)."""

    depth: int = setting("experiment.lissa.depth", 100, "recursion steps, one random batch each")
    scale: float = setting("experiment.lissa.scale", 10.0, "above the Hessian's largest eigenvalue")
    damping: float = setting("experiment.lissa.damping", 0.01, "adds damping x scale to the Hessian's diagonal")
    batch_size: int = setting("experiment.lissa.batch_size", 8, "training samples per Hessian-vector product")
    seed: int = setting("experiment.lissa.seed", 0, "seed of the batch sampling")


@dataclass(frozen=True)
class PreconditionSettings:
    """Preconditioned queries (C + λI)⁻¹ q in the compressed space (methods ending in _pre; score.precondition)."""

    damping: float = setting(
        "experiment.precondition.damping", 0.1, "λ as a fraction of the mean eigenvalue tr(C)/K' of the covariance C"
    )
    max_rows: int | None = setting(
        "experiment.precondition.max_rows", None, "training rows C is estimated from (None: all of them)"
    )
