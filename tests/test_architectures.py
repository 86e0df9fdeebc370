"""Every trainable parameter, captured exactly: batched per-sample gradients against fp64 autograd, one sample at a
time, on tiny random models of each architecture family (tied and untied embeddings, GPT-2's Conv1D, GPT-NeoX's
fused qkv, Qwen2's qkv biases, Gemma 3's scaled embeddings), with and without a PEFT LoRA adapter, and on the
real SmolLM2-135M-Instruct."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from rapidin.cache.shard import sample_gradients
from rapidin.errors import RapidinError
from rapidin.gradients.compress import ExactCompressor, FactoredCompressor, RapidGradCompressor
from rapidin.gradients.loss import collate
from rapidin.gradients.model import coverage, load_model, parameter_blocks, select_modules
from rapidin.gradients.rapidgrad import RapidGrad

from .conftest import random_samples, tiny_llama
from .test_capture import autograd_gradient

VOCAB = 61
SMALL = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2)
ARCHITECTURES = {
    # pad_token_id 5 occurs in the samples: the embedding's padding_idx row has no gradient
    "llama_tied": lambda: LlamaForCausalLM(LlamaConfig(**SMALL, tie_word_embeddings=True, pad_token_id=5)),
    "llama": lambda: tiny_llama(),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=16, n_layer=2, n_head=2)),
    "gpt_neox": lambda: GPTNeoXForCausalLM(GPTNeoXConfig(**SMALL, max_position_embeddings=64)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**SMALL, num_key_value_heads=1, tie_word_embeddings=True)),
    # scaled embeddings (rows · √hidden), q/k norms, sliding-window layers; tied by default
    "gemma3": lambda: Gemma3ForCausalLM(
        Gemma3TextConfig(**SMALL, num_key_value_heads=1, head_dim=8, max_position_embeddings=64, sliding_window=4)
    ),
}
# Gemma's norms compute in float32 even in an fp64 model: fp32 rounding there, fp64 elsewhere
TOLERANCE = {name: dict(rtol=1e-9, atol=1e-12) for name in ARCHITECTURES} | {"gemma3": dict(rtol=1e-5, atol=1e-7)}
TIED = {"llama_tied": "model.embed_tokens", "gpt2": "transformer.wte", "qwen2": "model.embed_tokens"}
TIED |= {"gemma3": "model.embed_tokens"}
LORA = {  # the extras a PEFT config can train besides A and B: modules_to_save copies and biases
    "llama_tied": dict(target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens"]),
    "llama": dict(target_modules=["q_proj", "o_proj"], modules_to_save=["lm_head"]),
    "gpt2": dict(target_modules=["c_attn"], fan_in_fan_out=True, bias="all", modules_to_save=["ln_f"]),
    "gpt_neox": dict(target_modules=["query_key_value"], bias="all"),
    "qwen2": dict(target_modules=["q_proj", "k_proj", "v_proj"], bias="all", modules_to_save=["embed_tokens"]),
    "gemma3": dict(target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens"]),
}


def build(architecture: str, lora: bool = False):
    torch.manual_seed(0)
    model = ARCHITECTURES[architecture]().double().eval()
    if lora:  # random B (not zeros), so that every A has a gradient
        config = LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, init_lora_weights=False, **LORA[architecture])
        model = get_peft_model(model, config).double().eval()
    return model


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)  # a tied parameter counts once


def exact_vectors(model, blocks, samples, normalize=True) -> torch.Tensor:
    batch = collate(samples, pad_id=0)  # padded: lengths differ
    compressor = ExactCompressor(blocks, normalize)
    return sample_gradients(model, select_modules(model), compressor, batch, batch.mean_response_weights)["exact"]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_batched_capture_of_every_trainable_parameter_equals_fp64_autograd(architecture, lora):
    model = build(architecture, lora)
    modules = select_modules(model)
    blocks = parameter_blocks(modules)
    cover = coverage(model, blocks)
    assert cover["left_out"] == [] and cover["D"] == trainable(model) and cover["fraction"] == 1.0
    tied = [b for b in blocks if len(b.uses) > 1]
    if architecture in TIED and not lora:  # one block for the shared weight, reached from both modules
        assert [b.uses for b in tied] == [((TIED[architecture], "weight"), ("lm_head", "weight"))]
    else:
        assert tied == []
    samples = random_samples(5, seed=len(architecture))
    for normalize in (False, True):
        want = torch.stack([autograd_gradient(model, blocks, s, normalize) for s in samples])
        torch.testing.assert_close(exact_vectors(model, blocks, samples, normalize), want, **TOLERANCE[architecture])


def test_parameters_linear_keeps_linear_and_conv1d_layers_and_the_tied_embedding_and_logs_the_rest():
    model = build("gpt2")
    modules = select_modules(model, parameters="linear")
    blocks = parameter_blocks(modules)
    assert {type(m).__name__ for m in modules.values()} == {"Conv1D", "Linear", "Embedding"}
    assert [b.name for b in blocks if "wte" in b.name] == ["transformer.wte.weight"]  # lm_head's tied weight
    cover = coverage(model, blocks, "linear")
    assert "transformer.wpe.weight" in cover["left_out"] and "transformer.h.0.ln_1.weight" in cover["left_out"]
    assert cover["D"] + sum(p.numel() for n, p in model.named_parameters() if n in cover["left_out"]) == trainable(
        model
    )
    samples = random_samples(3)
    want = torch.stack([autograd_gradient(model, blocks, s) for s in samples])
    batch = collate(samples, pad_id=0)
    got = sample_gradients(model, modules, ExactCompressor(blocks), batch, batch.mean_response_weights)["exact"]
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("architecture", ["llama_tied", "gpt2", "gpt_neox"])
def test_rapidgrad_of_the_new_blocks_is_the_sketch_of_the_exact_gradient(architecture):
    """Embedding rows sketched sparsely, tied and norm blocks: the same numbers as sketching the exact vector."""
    model = build(architecture)
    modules = select_modules(model)
    blocks = parameter_blocks(modules)
    samples = random_samples(4, seed=3)
    exact = exact_vectors(model, blocks, samples)
    batch = collate(samples, pad_id=0)
    sketch = RapidGradCompressor(blocks, [64, 1024], seed=5)
    got = sample_gradients(model, modules, sketch, batch, batch.mean_response_weights)
    want = RapidGrad(exact.shape[1], [64, 1024], seed=5)(exact)
    for k in (64, 1024):
        torch.testing.assert_close(got[f"k{k}"], want[k], rtol=1e-9, atol=1e-12)


def test_factored_normalises_embedding_and_tied_blocks_by_their_exact_norms():
    model = build("llama_tied")
    modules = select_modules(model)
    blocks = parameter_blocks(modules)
    samples = random_samples(3, seed=2)
    raw_exact = exact_vectors(model, blocks, samples, normalize=False)
    batch = collate(samples, pad_id=0)
    weights = batch.mean_response_weights
    raw, normalised = (
        sample_gradients(model, modules, FactoredCompressor(blocks, 3, 0, normalize), batch, weights)
        for normalize in (False, True)
    )
    slots = FactoredCompressor(blocks, 3, 0).slots
    for block in blocks:
        norms = raw_exact[:, block.offset : block.offset + block.size].norm(dim=1, keepdim=True)
        slot = slots[block]
        assert (slot.stop - slot.start) == (9 if block.outer else 3)
        torch.testing.assert_close(normalised["factored"][:, slot], raw["factored"][:, slot] / norms)


def test_a_module_it_cannot_capture_is_an_error_naming_it():
    model = get_peft_model(build("llama"), LoraConfig(r=2, target_modules=["embed_tokens"]))  # LoRA on embeddings
    with pytest.raises(RapidinError, match=r"^model\.modules: cannot capture .*embed_tokens\.lora_embedding_A"):
        parameter_blocks(select_modules(model))


@pytest.mark.slow
def test_smollm2_tied_embeddings_and_a_layer_equal_autograd(tmp_path):
    """The real pretrained SmolLM2-135M-Instruct (tied embeddings), fp32: its tied embedding, first layer and final
    norm on three samples, against plain autograd one sample at a time."""
    pytest.importorskip("gguf")
    from rapidin.experiments.pretrained import convert_gguf, smollm2_gguf

    try:
        gguf = smollm2_gguf()
    except RapidinError as error:
        pytest.skip(str(error))
    convert_gguf(gguf, tmp_path / "smollm2")
    model, tokenizer = load_model(str(tmp_path / "smollm2"))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    modules = select_modules(model, r"lm_head|layers\.0\.|model\.norm")  # embed_tokens comes with the tied head
    blocks = parameter_blocks(modules)
    assert blocks[0].uses == (("model.embed_tokens", "weight"), ("lm_head", "weight"))
    texts = [("What is 2 + 2?", "4."), ("Name a colour.", "Blue, like the sky."), ("Say hi.", "Hi!")]
    samples = []
    for prompt, response in texts:
        ids = tokenizer(prompt)["input_ids"]
        samples.append((ids + tokenizer(" " + response)["input_ids"] + [tokenizer.eos_token_id], len(ids)))
    batch = collate(samples, pad_id=tokenizer.pad_token_id)
    got = sample_gradients(model, modules, ExactCompressor(blocks), batch, batch.mean_response_weights)["exact"]
    for row, sample in enumerate(samples):
        want = autograd_gradient(model, blocks, sample)
        for block in blocks:  # unit blocks: per-tensor cosines and differences
            part = slice(block.offset, block.offset + block.size)
            cosine = (got[row, part] @ want[part]).item()
            assert cosine > 1 - 1e-5, (block.name, cosine)
            assert (got[row, part] - want[part]).norm() < 1e-3, block.name
