"""The size plan (rapidin.cache.plan): sizes worked by hand, the refusal and the key it names, outputs already on disk,
and D and the per-sample numbers of the meta-device model against the caches actually written."""

from __future__ import annotations

import dataclasses
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch
import zarr

from rapidin.cache.plan import gradient_layout, plan, size
from rapidin.cache.shard import CacheSettings, cache_gradients
from rapidin.errors import RapidinError

from .conftest import tiny_llama

ARRAYS = {"k1024": 1024, "k4096": 4096}
# 1000 samples × 5120 numbers × 2 bytes; 10 queries + 40 query tokens, as vectors and as 2 float32 score stores
CACHE, QUERIES, SCORES = 1000 * 5120 * 2, 50 * 5120 * 2, 2 * 50 * 1000 * 4
Usage = namedtuple("Usage", "total used free")


def planned(tmp_path, monkeypatch, free: int, store: bool = True, **settings):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(1 << 50, 0, free))
    arrays = {"exact": 123456} if settings.get("compressor") == "none" else ARRAYS
    return plan(1000, 10, 123456, arrays, CacheSettings(**settings), 4, store, tmp_path / "results/x", n_token_rows=40)


def test_sizes_by_hand(tmp_path, monkeypatch):
    sizes = planned(tmp_path, monkeypatch, free=1 << 40)
    assert (sizes.bytes_per_sample, sizes.cache_bytes, sizes.query_bytes, sizes.score_bytes) == (
        10240,
        CACHE,
        QUERIES,
        SCORES,
    )
    assert sizes.needed_bytes == CACHE + QUERIES + SCORES
    text = "\n".join(sizes.lines())
    assert "N = 1,000 training samples in 4 shards, 10 queries (40 query tokens" in text
    assert "D = 123,456, rapidgrad k1024, k4096: 5,120 numbers per sample in float16, 10.0 KiB per sample" in text
    assert f"training cache 9.8 MiB in {tmp_path}/results/x/cache/train" in text
    assert "1.0 TiB free" in text
    assert planned(tmp_path, monkeypatch, free=1 << 40, store=False).cache_bytes == 0


def test_size_units():
    assert [size(n) for n in (0, 1023, 1024, 1536, 7 << 30, 3 << 50)] == [
        "0 B",
        "1023 B",
        "1.0 KiB",
        "1.5 KiB",
        "7.0 GiB",
        "3.0 PiB",
    ]


def test_a_cache_that_does_not_fit_is_refused_naming_the_keys(tmp_path, monkeypatch):
    everything = CACHE + QUERIES + SCORES
    planned(tmp_path, monkeypatch, free=everything).check()  # just fits
    with pytest.raises(RapidinError, match=r"^cache.store: the training cache of 1,000 samples needs 9.8 MiB") as e:
        planned(tmp_path, monkeypatch, free=everything - 1).check()
    assert "lower cache.k, or set cache.store: false" in str(e.value) and "\n" not in str(e.value)
    planned(tmp_path, monkeypatch, free=everything - 1, store=False).check()  # only the scores: they fit
    with pytest.raises(RapidinError, match=r"lower cache.k, set cache.dtype: float16, or set cache.store: false"):
        planned(tmp_path, monkeypatch, free=everything, dtype="float32").check()
    with pytest.raises(RapidinError, match=r"set cache.compressor: rapidgrad, or set cache.store: false"):
        planned(tmp_path, monkeypatch, free=50 * 123456 * 2 + SCORES, compressor="none").check()
    with pytest.raises(RapidinError, match=r"x: the run needs .* \(scores of 50 query rows × 1,000 samples"):
        planned(tmp_path, monkeypatch, free=QUERIES + SCORES - 1, store=False).check()


def test_outputs_already_written_need_no_new_room(tmp_path, monkeypatch):
    shard = tmp_path / "results/x/cache/train/00000.zarr/k4096/c"
    shard.mkdir(parents=True)
    (shard / "0").write_bytes(bytes(5000))
    sizes = planned(tmp_path, monkeypatch, free=CACHE + QUERIES + SCORES - 5000)
    assert sizes.existing_bytes == 5000
    sizes.check()
    assert "of the outputs already there" in sizes.lines()[-1]


@pytest.mark.parametrize(
    "settings",
    [CacheSettings(k=(1024, 4096)), CacheSettings("factored", rank=4), CacheSettings("none", dtype="float32")],
    ids=["rapidgrad", "factored", "none"],
)
def test_layout_and_bytes_are_those_of_the_cache_written(model_and_tokens, tmp_path, monkeypatch, settings):
    model, tokens = str(model_and_tokens / "model"), str(model_and_tokens / "tokens/queries.zarr")
    cache = dataclasses.replace(settings, model_dtype="float32")
    cache_gradients(tokens, model, str(tmp_path / "cache.zarr"), cache, device="cpu")
    group = zarr.open_group(tmp_path / "cache.zarr", mode="r")
    arrays = {name: group[name].shape[1] for name in group.array_keys() if name not in ("ids", "done")}
    d, layout = gradient_layout(model, None, settings)
    assert (d, layout) == (group.attrs["rapidin"]["D"], arrays)
    sizes = plan(group["ids"].shape[0], 0, d, layout, settings, 1, True, tmp_path / "results")
    assert sizes.cache_bytes == sum(group[name].nbytes for name in arrays)


def test_layout_with_a_lora_adapter_counts_its_trainable_parameters(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = tiny_llama(torch.float32)
    model.save_pretrained(tmp_path / "model")
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    lora.save_pretrained(tmp_path / "adapter")
    trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    d, arrays = gradient_layout(str(tmp_path / "model"), str(tmp_path / "adapter"), CacheSettings("none"))
    assert d == trainable == 2 * 2 * 4 * (16 + 16) and arrays == {"exact": d}


def test_a_missing_model_is_one_line_naming_the_key(tmp_path):
    with pytest.raises(RapidinError, match=r"^model.path: .*nowhere is not a Hugging Face model directory"):
        gradient_layout(str(Path(tmp_path) / "nowhere"), None, CacheSettings())
