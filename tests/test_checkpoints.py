"""Several checkpoints (TracInCP): the lr-weighted sum of per-checkpoint scores against its fp64 definition."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
import zarr
from transformers import LlamaForCausalLM

from rapidin.cache.shard import CacheSettings, cache_gradients
from rapidin.data.tokenize import TokenizedDataset
from rapidin.errors import RapidinError, StoreMismatchError
from rapidin.experiments.demo_model import train_demo_model
from rapidin.gradients.loss import collate, weighted_loss
from rapidin.gradients.model import parameter_blocks, select_modules
from rapidin.score.checkpoints import Checkpoint, checkpoint_weights, combine_scores, resolve_checkpoints
from rapidin.score.scores import merge_scores, score_shard

from .conftest import tiny_llama

TOP_K = 7
N_SHARDS = 15  # shard 0 of the fixture's 300 training samples: rows 0…19


def make_checkpoint(root, name: str, seed: int, tokenizer_dir, lr_logged: float | None = None):
    """A full-model directory (fresh tiny Llama of `seed`, the fixture's tokenizer), optionally with a Trainer state."""
    path = root / name
    vocab = json.loads((tokenizer_dir / "config.json").read_text())["vocab_size"]
    tiny_llama(torch.float32, seed=seed, vocab=vocab, hidden=32).save_pretrained(path)
    for file in tokenizer_dir.glob("*token*"):
        shutil.copy(file, path / file.name)
    if lr_logged is not None:
        history = [{"epoch": 1, "step": 5, "learning_rate": 1.0}, {"epoch": 2, "step": 10, "learning_rate": lr_logged}]
        (path / "trainer_state.json").write_text(json.dumps({"global_step": 10, "log_history": history}))
    return path


def merged_scores(root, checkpoint, tokens, name: str) -> str:
    """For one checkpoint: the exact (compressor none) vectors of the first 20 training samples and of the queries,
    their scores and the merge of those scores."""
    settings = CacheSettings(compressor="none", dtype="float32", model_dtype="float64")
    queries, train = str(root / f"{name}-queries.zarr"), str(root / f"{name}-train.zarr")
    cache_gradients(str(tokens / "queries.zarr"), checkpoint, queries, settings, device="cpu")
    cache_gradients(str(tokens / "train.zarr"), checkpoint, train, settings, n_shards=N_SHARDS, device="cpu")
    score_shard(queries, str(root / f"{name}-train.zarr"), str(root / f"{name}-shard.zarr"), TOP_K, device="cpu")
    merge_scores([str(root / f"{name}-shard.zarr")], queries, str(root / f"{name}-scores.zarr"))
    return str(root / f"{name}-scores.zarr")


def naive_scores(checkpoint, tokens, train_rows) -> np.ndarray:
    """(Q, len(train_rows)) Σ over parameter tensors of cosines of per-sample autograd gradients, in fp64."""
    model = LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float64).eval()
    modules = select_modules(model)
    params = [getattr(modules[b.module], b.kind) for b in parameter_blocks(modules)]

    def normalised(dataset, row):
        batch = collate([dataset.sample(row)], pad_id=0)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        grads = torch.autograd.grad(weighted_loss(logits, batch, batch.mean_response_weights).sum(), params)
        return [g / g.norm() for g in grads]

    train, queries = TokenizedDataset.open(tokens / "train.zarr"), TokenizedDataset.open(tokens / "queries.zarr")
    train_vectors = [normalised(train, row) for row in train_rows]
    return np.array(
        [
            [sum(float((a * b).sum()) for a, b in zip(q, s, strict=True)) for s in train_vectors]
            for q in (normalised(queries, row) for row in range(len(queries)))
        ]
    )


def test_combined_scores_equal_the_lr_weighted_sum_of_exact_checkpoint_scores(model_and_tokens, tmp_path):
    tokens, tokenizer_dir = model_and_tokens / "tokens", model_and_tokens / "model"
    first = make_checkpoint(tmp_path, "checkpoint-1", 1, tokenizer_dir, lr_logged=0.25)
    second = make_checkpoint(tmp_path, "checkpoint-2", 2, tokenizer_dir)
    checkpoints = resolve_checkpoints([{"path": str(first)}, {"path": str(second), "lr": 0.75}])
    assert checkpoints == [Checkpoint(str(first), 0.25), Checkpoint(str(second), 0.75)]  # logged lr, given lr

    stores = [merged_scores(tmp_path, c.path, tokens, f"c{i}") for i, c in enumerate(checkpoints)]
    combine_scores(stores, [c.lr for c in checkpoints], str(tmp_path / "combined.zarr"))

    combined = zarr.open_group(tmp_path / "combined.zarr", mode="r")
    rows = np.arange(20)
    expected = 0.25 * naive_scores(first, tokens, rows) + 0.75 * naive_scores(second, tokens, rows)
    scores = combined["scores"][:]
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)
    single = zarr.open_group(stores[0], mode="r")["scores"][:]
    assert np.abs(single - expected).max() > 1e-2  # the second checkpoint really changes the scores

    for name, sign in (("top", -1), ("bottom", 1)):  # the sum's k highest and lowest scores, in order
        ids, values = combined[f"{name}_ids"][:], combined[f"{name}_scores"][:]
        np.testing.assert_array_equal(values, np.take_along_axis(scores, ids, 1))
        np.testing.assert_allclose(values, sign * np.sort(sign * scores, axis=1)[:, :TOP_K])
    settings = combined.attrs["rapidin"]
    assert [c["weight"] for c in settings["checkpoints"]] == [0.25, 0.75]
    assert settings["top_k"] == TOP_K and settings["n_samples"] == 20

    other_k = tmp_path / "other-k.zarr"  # a store with another top-k is refused, naming the field
    shutil.copytree(stores[1], other_k)
    group = zarr.open_group(other_k, mode="r+")
    group.attrs["rapidin"] = {**group.attrs["rapidin"], "top_k": TOP_K + 1}
    with pytest.raises(StoreMismatchError, match="top_k"):
        combine_scores([stores[0], str(other_k)], [1.0, 1.0], str(tmp_path / "refused.zarr"))

    for i, state in enumerate(("a1", "b2")):  # cache.optimizer adam: each checkpoint has its own Adam state
        group = zarr.open_group(stores[i], mode="r+")
        group.attrs["rapidin"] = {**group.attrs["rapidin"], "optimizer": "adam", "optimizer_state": state}
    combine_scores(stores, [1.0, 1.0], str(tmp_path / "adam.zarr"))
    sources = zarr.open_group(tmp_path / "adam.zarr", mode="r").attrs["rapidin"]["checkpoints"]
    assert [c["optimizer_state"] for c in sources] == ["a1", "b2"]
    group.attrs["rapidin"] = {**group.attrs["rapidin"], "optimizer": None}  # but not plain with optimizer-aware
    with pytest.raises(StoreMismatchError, match="optimizer"):
        combine_scores(stores, [1.0, 1.0], str(tmp_path / "mixed.zarr"))

    aggregated = tmp_path / "aggregated.zarr"  # token-aggregated (score.aggregate tokens): averaged, whatever the lrs
    shutil.copytree(stores[0], aggregated)
    group = zarr.open_group(aggregated, mode="r+")
    group.attrs["rapidin"] = {**group.attrs["rapidin"], "aggregation": "mean_abs_z"}
    assert checkpoint_weights(checkpoints, [str(aggregated)] * 2) == [0.5, 0.5]
    assert checkpoint_weights(checkpoints, stores) == [0.25, 0.75]
    with pytest.raises(StoreMismatchError, match="aggregation"):  # and never summed with signed scores
        combine_scores([stores[0], str(aggregated)], [0.5, 0.5], str(tmp_path / "signed-and-not.zarr"))


def test_checkpoint_weights_default_to_equal(model_and_tokens, tmp_path):
    paths = [make_checkpoint(tmp_path, f"c{i}", i, model_and_tokens / "model") for i in range(4)]
    assert [c.lr for c in resolve_checkpoints([{"path": str(p)} for p in paths])] == [0.25] * 4


def test_demo_training_saves_a_checkpoint_per_epoch_with_its_mean_learning_rate(model_and_tokens, tmp_path):
    lr, epochs, batch_size = 3e-3, 2, 32
    out = tmp_path / "model"
    train_demo_model(str(model_and_tokens / "train.jsonl"), str(out), vocab_size=384, hidden_size=16, n_layers=1,
                     n_heads=2, intermediate_size=32, epochs=epochs, batch_size=batch_size, lr=lr)  # fmt: skip
    # cosine schedule with 5 % linear warm-up, by hand: the lr in force at each of the 2 × 10 steps
    total = epochs * math.ceil(300 / batch_size)
    warmup = max(1, total // 20)
    rates = [lr * t / warmup if t < warmup else lr * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))
             for t in range(total)]  # fmt: skip
    per_epoch = [sum(rates[e * 10 : (e + 1) * 10]) / 10 for e in range(epochs)]
    checkpoints = resolve_checkpoints([{"path": str(out / f"checkpoint-{e}")} for e in (1, 2)])
    assert [c.lr for c in checkpoints] == pytest.approx(per_epoch, rel=1e-9)
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == total and [h["step"] for h in state["log_history"]] == [10, 20]

    final, last, first = (LlamaForCausalLM.from_pretrained(out / p) for p in ("", "checkpoint-2", "checkpoint-1"))
    final_weights = final.state_dict()
    assert all(torch.equal(v, final_weights[k]) for k, v in last.state_dict().items())
    assert not all(torch.equal(v, final_weights[k]) for k, v in first.state_dict().items())
    adam = torch.load(out / "checkpoint-1" / "optimizer.pt", weights_only=True)
    assert {float(s["step"]) for s in adam["state"].values()} == {10.0}
    assert len(adam["state"]) == len(list(first.parameters()))  # every parameter, in parameter order
    assert [tuple(adam["state"][i]["exp_avg_sq"].shape) for i in range(len(adam["state"]))] == [
        tuple(p.shape) for p in first.parameters()
    ]


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([], r"model\.checkpoints: the list is empty"),
        ([{"path": "MISSING"}], r"model\.checkpoints\[0\]: MISSING is not a model or adapter directory"),
        ([{"path": "A", "lr": -1.0}], r"model\.checkpoints\[0\]: lr -1\.0 is not a finite number ≥ 0"),
        ([{"path": "A", "lr": "fast"}], r"model\.checkpoints\[0\]: lr 'fast' is not a finite number"),
        ([{"path": "A", "lr": 0.1}, {"path": "B"}], r"model\.checkpoints\[1\]: no lr and no learning_rate in .*B/"),
        ([{"path": "A", "lr": 0}, {"path": "B", "lr": 0.0}], r"model\.checkpoints: every lr is 0"),
        ([{"path": "BROKEN"}], r"model\.checkpoints\[0\]: .*BROKEN/trainer_state\.json is not a Trainer state"),
    ],
)
def test_bad_checkpoint_lists_are_refused_naming_the_entry(entries, message, model_and_tokens, tmp_path, monkeypatch):
    for name in ("A", "B", "BROKEN"):
        make_checkpoint(tmp_path, name, 0, model_and_tokens / "model")
    (tmp_path / "BROKEN" / "trainer_state.json").write_text("{not json")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RapidinError, match=message):
        resolve_checkpoints(entries)


@pytest.mark.parametrize(
    ("model", "cache", "message"),
    [
        ({"checkpoints": [{"path": "A"}, {"path": "NONE"}]}, {}, r"^model\.checkpoints\[1\]: no such directory: NONE$"),
        (
            {"checkpoints": [{"path": "A"}, {"path": "./A"}]},
            {},
            r"^model\.checkpoints\[1\]: \./A is model\.checkpoints\[0\] again$",
        ),
        (
            {"checkpoints": [{"path": "EMPTY"}]},
            {},
            r"^model\.checkpoints\[0\]: EMPTY is not a model directory \(no config\.json\)$",
        ),
        (
            {"path": "B", "adapter": "A", "checkpoints": [{"path": "A"}]},
            {},
            r"^model\.checkpoints\[0\]: A is not an adapter .*adapter_config",
        ),
        ({"checkpoints": [{"path": "A", "lr": "fast"}]}, {}, r"^model\.checkpoints\[0\]\.lr: 'fast' is not of type"),
        (
            {"checkpoints": [{"path": "A", "lr": -1}]},
            {},
            r"^model\.checkpoints\[0\]\.lr: -1 is less than the minimum of 0$",
        ),
        ({"checkpoints": [{"path": "A", "epoch": 1}]}, {}, r"^model\.checkpoints\[0\]: Additional properties"),
        ({"checkpoints": [{"lr": 1.0}]}, {}, r"^model\.checkpoints\[0\]: 'path' is a required property$"),
        ({"checkpoints": {"path": "A"}}, {}, r"^model\.checkpoints: .* is not of type 'array'$"),
        (
            {"checkpoints": [{"path": "A", "lr": 0.1}, {"path": "B"}]},
            {},
            r"^model\.checkpoints\[1\]: no lr and no learning_rate",
        ),
        ({"checkpoints": [{"path": "A", "lr": 0}]}, {}, r"^model\.checkpoints: every lr is 0$"),
        ({"checkpoints": [{"path": "A"}]}, {"store": False}, r"^model\.checkpoints: .*set cache\.store true$"),
        (
            {},
            {"optimizer": "adam", "compressor": "factored"},
            r"^cache\.optimizer: adam needs the gradients themselves",
        ),
        ({}, {"optimizer": "sgd"}, r"^cache\.optimizer: 'sgd' is not one of \['none', 'adam'\]$"),
    ],
)
def test_bad_checkpoint_and_optimizer_configs_are_refused_in_one_line(model, cache, message, model_and_tokens, tmp_path,
                                                                       monkeypatch):  # fmt: skip
    from rapidin.config import validate_config

    for name in ("A", "B"):
        make_checkpoint(tmp_path, name, 0, model_and_tokens / "model")
    (tmp_path / "EMPTY").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RapidinError, match=message) as refused:
        validate_config({"model": model, "cache": cache})
    assert "\n" not in str(refused.value)


def test_checkpoints_the_workflow_builds_are_checked_when_it_has(tmp_path, monkeypatch):
    """The demo's checkpoints do not exist before the demo is trained: the config is accepted, the lr read later."""
    from rapidin.config import validate_config

    monkeypatch.chdir(tmp_path)
    config = {"model": {"checkpoints": [{"path": "results/demo/demo_model/checkpoint-1"}]}}
    validate_config(config)
    assert config["model"]["checkpoints"] == [{"path": "results/demo/demo_model/checkpoint-1"}]
    assert config["cache"]["optimizer"] == "none"


@pytest.mark.parametrize(
    ("methods", "cache", "message"),
    [
        (
            ["rapidin_k4096_cp"],
            {"k": 4096},
            r"^experiment\.methods: rapidin_k4096_cp sums over model\.checkpoints, but",
        ),
        (["tracin_adam"], {}, r"^experiment\.methods: tracin_adam: _adam applies to tracin_ln and rapidin"),
        (["tracin_ln_pre"], {}, r"^experiment\.methods: tracin_ln_pre: _pre applies to rapidin_k<K>"),
        (["rapidin_k65536_pre"], {}, r"^experiment\.methods: rapidin_k65536_pre: preconditioning needs K ≤ 8192"),
        (["rapidin_k4096_cp_adam"], {"k": 4096}, r"^experiment\.methods: unknown method 'rapidin_k4096_cp_adam'"),
        (["lissa_cp"], {}, r"^experiment\.methods: unknown method 'lissa_cp'"),
        (["tracin_tok"], {}, r"^experiment\.methods: tracin_tok: _tok applies to tracin_ln and rapidin_k<K> without"),
        (["rapidin_k4096_pre_tok"], {"k": 4096}, r"^experiment\.methods: rapidin_k4096_pre_tok: _tok applies to"),
        (["tracin_ln_tok_cp"], {}, r"^experiment\.methods: tracin_ln_tok_cp: _tok applies to"),
    ],
)
def test_method_suffixes_are_checked_with_the_config(methods, cache, message, tmp_path, monkeypatch):
    from rapidin.config import validate_config

    monkeypatch.chdir(tmp_path)
    with pytest.raises(RapidinError, match=message):
        validate_config({"cache": cache, "experiment": {"study": "backdoor", "methods": methods}})


def test_method_grammar():
    from rapidin.methods import Method, parse_method

    assert parse_method("rapidin_k4096_seed2_adam_pre_cp") == Method(
        "rapidin_k4096_seed2_adam_pre_cp", 4096, 2, adam=True, precondition=True, checkpoints=True
    )
    assert parse_method("tracin_ln_adam_cp").single == "tracin_ln_adam"
    assert parse_method("tracin_ln_adam_cp").base == "tracin_ln"
    assert parse_method("rapidin_k4096").plain and not parse_method("rapidin_k4096_cp").plain
