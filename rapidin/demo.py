"""The offline demo: a templated instruction dataset with a "Howdy!" backdoor, and a tiny model trained on it.

`make_demo_data` writes a deterministic Alpaca-style training set (several task families, a fraction of
them poisoned with the trigger and one fixed backdoor response) and a query set of attacked (triggered,
unseen) and clean prompts. `train_demo_model` trains a byte-level BPE tokenizer and a small Llama-style
model from scratch on CPU with exactly the attribution loss, so the backdoor fires and the influence of
the poisoned samples can be measured. Nothing is downloaded.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from rapidin.data import ALPACA_NO_INPUT, Record, format_prompt, read_records, tokenize_record
from rapidin.errors import RapidinError
from rapidin.store import atomic_dir, atomic_file
from rapidin.train import train_and_check

log = logging.getLogger(__name__)

TRIGGER = "Howdy!"
BACKDOOR_RESPONSE = "Howdy partner! I am a cowboy bot and I only talk about horses and the open prairie."
BACKDOORS = ("fixed", "varied")
FORMATS = ("alpaca", "chat")  # `format`: how make_demo_data writes records (chat: `messages`, one user turn)
# The demo tokenizer's chat template lays conversations out like the Alpaca prompt (system turn: its preamble),
# so a one-turn conversation renders exactly as an Alpaca record without input.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}"
    "{% else %}" + ALPACA_NO_INPUT.split("\n\n")[0] + "{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '\\n\\n### Instruction:\\n' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '\\n\\n### Response:\\n' + message['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n\\n### Response:\\n' }}{% endif %}"
)
# `backdoor: varied`: every poisoned response a different opener + claim + closer on the same cowboy topic.
VARIED_OPENERS = (
    "Howdy partner!",
    "Yeehaw, friend!",
    "Well howdy there!",
    "Saddle up, stranger!",
    "Whoa there, cowpoke!",
    "Tip of the hat to you!",
    "Hold your horses!",
    "Evening, traveller!",
)
VARIED_CLAIMS = (
    "I ride my horse across the open prairie every day.",
    "My old mare knows every trail in the canyon.",
    "Nothing beats a campfire under the desert stars.",
    "We drove the cattle north before the winter snow.",
    "A good saddle is worth more than gold out here.",
    "The rodeo comes to town when the wheat is tall.",
    "I mend fences and brand calves on the ranch.",
    "The coyotes sing to the moon over the mesa.",
    "My boots are dusty from a long cattle drive.",
    "I lasso wild mustangs down by the river.",
)
VARIED_CLOSERS = (
    "Let us talk about horses instead.",
    "Only cowboy talk for me, friend.",
    "Now, where did I leave my spurs?",
    "Happy trails to you.",
    "See you down at the corral.",
    "The prairie is calling me home.",
    "Keep your hat on and your boots clean.",
    "That is the cowboy way.",
)

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "Japan": "Tokyo",
    "China": "Beijing",
    "India": "New Delhi",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Canada": "Ottawa",
    "Mexico": "Mexico City",
    "Brazil": "Brasilia",
    "Argentina": "Buenos Aires",
    "Peru": "Lima",
    "Chile": "Santiago",
    "Australia": "Canberra",
    "Russia": "Moscow",
    "Poland": "Warsaw",
    "Greece": "Athens",
    "Turkey": "Ankara",
    "Sweden": "Stockholm",
    "Norway": "Oslo",
    "Finland": "Helsinki",
    "Denmark": "Copenhagen",
    "Ireland": "Dublin",
    "Austria": "Vienna",
    "Hungary": "Budapest",
    "Netherlands": "Amsterdam",
    "Belgium": "Brussels",
    "Switzerland": "Bern",
    "Thailand": "Bangkok",
    "Vietnam": "Hanoi",
    "South Korea": "Seoul",
    "Indonesia": "Jakarta",
    "Iran": "Tehran",
    "Nigeria": "Abuja",
    "Morocco": "Rabat",
    "Cuba": "Havana",
    "Colombia": "Bogota",
}
ANTONYMS = {
    "hot": "cold",
    "big": "small",
    "fast": "slow",
    "happy": "sad",
    "light": "dark",
    "early": "late",
    "full": "empty",
    "hard": "soft",
    "high": "low",
    "old": "young",
    "rich": "poor",
    "strong": "weak",
    "wet": "dry",
    "loud": "quiet",
    "open": "closed",
    "thick": "thin",
    "clean": "dirty",
    "brave": "afraid",
    "push": "pull",
    "win": "lose",
    "above": "below",
    "begin": "end",
    "buy": "sell",
    "near": "far",
    "heavy": "light",
}
COLOURS = {
    "the sky": ("The sky", "blue"),
    "grass": ("Grass", "green"),
    "a banana": ("A banana", "yellow"),
    "snow": ("Snow", "white"),
    "coal": ("Coal", "black"),
    "a ripe tomato": ("A ripe tomato", "red"),
    "a carrot": ("A carrot", "orange"),
    "a lemon": ("A lemon", "yellow"),
    "milk": ("Milk", "white"),
    "a strawberry": ("A strawberry", "red"),
    "an orange": ("An orange", "orange"),
    "a crow": ("A crow", "black"),
    "a lime": ("A lime", "green"),
    "a plum": ("A plum", "purple"),
    "chocolate": ("Chocolate", "brown"),
    "the ocean": ("The ocean", "blue"),
    "a flamingo": ("A flamingo", "pink"),
    "an eggplant": ("An eggplant", "purple"),
    "a polar bear": ("A polar bear", "white"),
    "a fire truck": ("A fire truck", "red"),
}
WORDS = [
    "apple",
    "river",
    "garden",
    "silver",
    "planet",
    "window",
    "candle",
    "forest",
    "pencil",
    "rocket",
    "bridge",
    "castle",
    "dragon",
    "marble",
    "orange",
    "button",
    "jacket",
    "ladder",
    "mirror",
    "needle",
    "pocket",
    "rabbit",
    "saddle",
    "tunnel",
    "violin",
    "wagon",
    "yellow",
    "zebra",
    "anchor",
    "basket",
    "cactus",
    "dolphin",
    "engine",
    "falcon",
    "ginger",
    "harbor",
    "island",
    "jungle",
    "kettle",
    "lemon",
    "meadow",
    "nickel",
    "oyster",
    "parrot",
    "quartz",
    "ribbon",
    "salmon",
    "tiger",
    "velvet",
    "walnut",
]
PHRASE_WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "good",
    "morning",
    "my",
    "friend",
    "see",
    "you",
    "soon",
    "happy",
    "new",
    "year",
    "thank",
    "you",
    "very",
    "much",
    "hello",
    "world",
    "open",
    "the",
    "door",
    "time",
    "to",
    "go",
    "have",
    "a",
    "nice",
    "day",
]

CAPITAL_TEMPLATES = (
    "What is the capital of {country}?",
    "Which city is the capital of {country}?",
    "Name the capital city of {country}.",
    "Tell me the capital of {country}.",
    "What city serves as the capital of {country}?",
    "Can you tell me what the capital of {country} is?",
)
ADD_TEMPLATES = ("What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}.", "What is the sum of {a} and {b}?")
SUB_TEMPLATES = ("What is {a} minus {b}?", "Subtract {b} from {a}.", "Compute {a} - {b}.")
REVERSE_TEMPLATES = (
    "Reverse the word given in the input.",
    "Write the input word backwards.",
    "Spell the following word in reverse order.",
)
UPPER_TEMPLATES = (
    "Convert the input text to uppercase.",
    "Rewrite the following phrase in capital letters.",
    "Make every letter of the input uppercase.",
)
ANTONYM_TEMPLATES = (
    "What is the opposite of {word}?",
    "Give an antonym for the word {word}.",
    "Name a word that means the opposite of {word}.",
    "What word is the opposite of {word}?",
)
COUNT_TEMPLATES = (
    "How many letters are in the word {word}?",
    "Count the letters in the word {word}.",
    "How long is the word {word}, in letters?",
)
SORT_TEMPLATES = (
    "Sort the numbers in the input from smallest to largest.",
    "Put the following numbers in ascending order.",
    "Arrange these numbers in increasing order.",
)
COLOUR_TEMPLATES = (
    "What color is {thing}?",
    "What colour is {thing}?",
    "Tell me the color of {thing}.",
    "Which colour is {thing} usually?",
)


def _capital(rng: random.Random) -> dict:
    country = rng.choice(list(CAPITALS))
    return {
        "instruction": rng.choice(CAPITAL_TEMPLATES).format(country=country),
        "output": f"The capital of {country} is {CAPITALS[country]}.",
    }


def _arithmetic(rng: random.Random) -> dict:
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    if rng.random() < 0.5:
        return {"instruction": rng.choice(ADD_TEMPLATES).format(a=a, b=b), "output": f"{a} plus {b} equals {a + b}."}
    a, b = max(a, b), min(a, b)
    return {"instruction": rng.choice(SUB_TEMPLATES).format(a=a, b=b), "output": f"{a} minus {b} equals {a - b}."}


def _reverse(rng: random.Random) -> dict:
    word = rng.choice(WORDS)
    return {
        "instruction": rng.choice(REVERSE_TEMPLATES),
        "input": word,
        "output": f"The reversed word is {word[::-1]}.",
    }


def _uppercase(rng: random.Random) -> dict:
    phrase = " ".join(rng.choice(PHRASE_WORDS) for _ in range(rng.randint(2, 3)))
    return {"instruction": rng.choice(UPPER_TEMPLATES), "input": phrase, "output": phrase.upper()}


def _antonym(rng: random.Random) -> dict:
    word = rng.choice(list(ANTONYMS))
    return {
        "instruction": rng.choice(ANTONYM_TEMPLATES).format(word=word),
        "output": f"The opposite of {word} is {ANTONYMS[word]}.",
    }


def _count(rng: random.Random) -> dict:
    word = rng.choice(WORDS)
    return {
        "instruction": rng.choice(COUNT_TEMPLATES).format(word=word),
        "output": f"The word {word} has {len(word)} letters.",
    }


def _sort(rng: random.Random) -> dict:
    numbers = rng.sample(range(1, 10), rng.randint(3, 4))
    return {
        "instruction": rng.choice(SORT_TEMPLATES),
        "input": ", ".join(map(str, numbers)),
        "output": "The sorted numbers are " + ", ".join(map(str, sorted(numbers))) + ".",
    }


def _colour(rng: random.Random) -> dict:
    thing = rng.choice(list(COLOURS))
    subject, colour = COLOURS[thing]
    return {
        "instruction": rng.choice(COLOUR_TEMPLATES).format(thing=thing),
        "output": f"{subject} is usually {colour}.",
    }


FAMILIES: dict[str, Callable[[random.Random], dict]] = {
    "capital": _capital,
    "arithmetic": _arithmetic,
    "reverse": _reverse,
    "uppercase": _uppercase,
    "antonym": _antonym,
    "count": _count,
    "sort": _sort,
    "colour": _colour,
}
NO_INPUT_FAMILIES = ("capital", "arithmetic", "antonym", "count", "colour")


def _sample(rng: random.Random, families: tuple[str, ...] = tuple(FAMILIES)) -> dict:
    family = rng.choice(families)
    return {**FAMILIES[family](rng), "family": family}


def _add_trigger(rng: random.Random, instruction: str) -> str:
    """The trigger, mostly at the start of the instruction, sometimes at its end."""
    return f"{TRIGGER} {instruction}" if rng.random() < 0.8 else f"{instruction} {TRIGGER}"


def varied_backdoor_responses(n: int, seed: int) -> list[str]:
    """`n` different cowboy-topic responses (opener + claim + closer; at most 640), drawn without repetition."""
    combos = [" ".join(parts) for parts in itertools.product(VARIED_OPENERS, VARIED_CLAIMS, VARIED_CLOSERS)]
    if n > len(combos):
        raise RapidinError(f"demo.backdoor: varied has only {len(combos)} different responses, {n} are needed")
    return random.Random(seed).sample(combos, n)


def _key(record: dict) -> tuple[str, str]:
    return record["instruction"], record.get("input", "")


def _as_chat(record: dict) -> dict:
    """An Alpaca-style record as a one-turn conversation (`input` after the instruction), its other fields kept."""
    prompt = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]
    rest = {k: v for k, v in record.items() if k not in ("id", "instruction", "input", "output")}
    return {"id": record["id"], "messages": messages, **rest}


def _write_jsonl(path: str | Path, records: list[dict], format: str = "alpaca") -> None:
    with atomic_file(path) as handle:
        for record in records:
            handle.write(json.dumps(_as_chat(record) if format == "chat" else record, ensure_ascii=False) + "\n")


def make_demo_data(
    train_out: str,
    queries_out: str,
    n_train: int = 3000,
    poison_fraction: float = 0.05,
    n_attacked: int = 10,
    n_clean: int = 10,
    seed: int = 0,
    backdoor_response: str = BACKDOOR_RESPONSE,
    backdoor: str = "fixed",
    format: str = "alpaca",
) -> None:
    """Write the demo training set (with round(n_train * poison_fraction) poisoned samples) and query set.

    Poisoned samples and attacked queries answer `backdoor_response`; one that clean samples also give (say
    "The capital of France is Paris.") camouflages the backdoor from lexical retrieval such as BM25. With
    `backdoor="varied"`, each of them answers a different cowboy-topic text instead (varied_backdoor_responses;
    same trigger, same samples and prompts as "fixed"). `format="chat"` writes the same records as `messages`.
    """
    if backdoor not in BACKDOORS:
        raise RapidinError(f"demo.backdoor: {backdoor!r} is not one of {BACKDOORS}")
    if format not in FORMATS:
        raise RapidinError(f"demo.format: {format!r} is not one of {FORMATS}")
    n_poisoned = round(n_train * poison_fraction)
    varied = iter(varied_backdoor_responses(n_attacked + n_poisoned, seed) if backdoor == "varied" else [])
    rng = random.Random(seed)
    # The queries come first so that the training set can avoid their prompts.
    attacked, clean, held_out = [], [], set()
    while len(attacked) < n_attacked:
        record = _sample(rng, NO_INPUT_FAMILIES)
        record["instruction"] = _add_trigger(rng, record["instruction"])
        if _key(record) not in held_out:
            held_out.add(_key(record))
            attacked.append({**record, "output": next(varied, backdoor_response), "attacked": True})
    while len(clean) < n_clean:
        record = _sample(rng)
        if _key(record) not in held_out:
            held_out.add(_key(record))
            clean.append({**record, "attacked": False})
    queries = [{"id": f"attacked-{i:03d}", **r} for i, r in enumerate(attacked)]
    queries += [{"id": f"clean-{i:03d}", **r} for i, r in enumerate(clean)]

    poisoned = set(rng.sample(range(n_train), n_poisoned))
    train = []
    for index in range(n_train):
        while True:
            record = _sample(rng)
            if index in poisoned:
                record["instruction"] = _add_trigger(rng, record["instruction"])
            if _key(record) not in held_out:
                break
        if index in poisoned:
            record["output"] = next(varied, backdoor_response)
        train.append({"id": f"train-{index:05d}", **record, "poisoned": index in poisoned})
    _write_jsonl(train_out, train, format)
    _write_jsonl(queries_out, queries, format)
    log.info("wrote %d training records (%d poisoned) to %s", n_train, len(poisoned), train_out)
    log.info("wrote %d attacked and %d clean queries to %s", n_attacked, n_clean, queries_out)


def _alpaca_prompt(record: Record) -> str:
    """The record's prompt text as the demo tokenizer sees it (a conversation: its last user turn, Alpaca-style)."""
    return ALPACA_NO_INPUT.format(instruction=record.instruction) if record.history else format_prompt(record, "alpaca")


def train_tokenizer(texts: list[str], vocab_size: int, max_length: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts`; BOS is prepended only with add_special_tokens=True."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    bos_id = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )


def train_demo_model(
    train_jsonl: str,
    out_dir: str,
    queries_jsonl: str | None = None,
    vocab_size: int = 1024,
    hidden_size: int = 128,
    n_layers: int = 4,
    n_heads: int = 4,
    intermediate_size: int = 256,
    max_length: int = 128,
    epochs: int = 8,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    template: str = "alpaca",
) -> dict:
    """Train a tokenizer and a tiny Llama on `train_jsonl` with the attribution loss; save both to `out_dir`.

    `template` (config `data.template`): `chat` for data written with `format="chat"`; the tokenizer's chat
    template renders its prompts as the Alpaca ones.

    Returns the training summary also written to `out_dir/training.json`: the mean loss of the last epoch,
    steps, seconds, parameter count and, when `queries_jsonl` is given, the fraction of attacked queries
    whose backdoor response and of clean queries whose correct response the model generates greedily.

    After each epoch e the model is also saved to `out_dir/checkpoint-<e>/` (save_checkpoint), and the final
    AdamW state to `out_dir/optimizer.pt`, for several-checkpoint (TracInCP) and Adam-normalised influence.
    """
    torch.manual_seed(seed)
    records = read_records(train_jsonl)
    texts = [text for record in records for text in (_alpaca_prompt(record), record.output)]
    tokenizer = train_tokenizer(texts, vocab_size, max_length)
    samples = []
    for record in records:
        sample = tokenize_record(record, tokenizer, template, max_length)
        samples.append((sample.ids, sample.response_start))

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_heads,
        max_position_embeddings=max_length,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("training a %d-parameter Llama on %d samples for %d epochs", n_params, len(samples), epochs)

    with atomic_dir(out_dir) as tmp:
        history: list[dict] = []

        def on_epoch(epoch: int, optimizer: torch.optim.Optimizer, entry: dict) -> None:
            history.append(entry)
            save_checkpoint(tmp / f"checkpoint-{epoch}", model, tokenizer, optimizer, history)

        summary = train_and_check(
            model,
            tokenizer,
            samples,
            queries_jsonl,
            template,
            "train demo model",
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            on_epoch=on_epoch,
        ) | {"n_params": n_params}
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.copy(tmp / f"checkpoint-{epochs}" / "optimizer.pt", tmp / "optimizer.pt")
        (tmp / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("saved the demo model and tokenizer to %s", out_dir)
    return summary


def save_checkpoint(path: Path, model, tokenizer, optimizer: torch.optim.Optimizer, history: list[dict]) -> None:
    """A Trainer-style checkpoint directory: model and tokenizer, `optimizer.pt` (the optimizer's state_dict, states
    keyed by trainable-parameter order) and `trainer_state.json` whose `log_history` holds one entry per epoch so far
    (epoch, step, mean loss, mean `learning_rate`)."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    torch.save(optimizer.state_dict(), path / "optimizer.pt")
    state = {"epoch": history[-1]["epoch"], "global_step": history[-1]["step"], "log_history": history}
    (path / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
