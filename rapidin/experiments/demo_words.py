"""The demo's word tables: task families of templated instructions, the trigger and the backdoor responses."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable

from rapidin.errors import RapidinError

TRIGGER = "Howdy!"
BACKDOOR_RESPONSE = "Howdy partner! I am a cowboy bot and I only talk about horses and the open prairie."
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


def sample_record(rng: random.Random, families: tuple[str, ...] = tuple(FAMILIES)) -> dict:
    family = rng.choice(families)
    return {**FAMILIES[family](rng), "family": family}


def add_trigger(rng: random.Random, instruction: str) -> str:
    """The trigger, mostly at the start of the instruction, sometimes at its end."""
    return f"{TRIGGER} {instruction}" if rng.random() < 0.8 else f"{instruction} {TRIGGER}"


def varied_backdoor_responses(n: int, seed: int) -> list[str]:
    """`n` different cowboy-topic responses (opener + claim + closer; at most 640), drawn without repetition."""
    combos = [" ".join(parts) for parts in itertools.product(VARIED_OPENERS, VARIED_CLAIMS, VARIED_CLOSERS)]
    if n > len(combos):
        raise RapidinError(f"demo.backdoor: varied has only {len(combos)} different responses, {n} are needed")
    return random.Random(seed).sample(combos, n)
