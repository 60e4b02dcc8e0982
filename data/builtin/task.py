"""The built-in task: write a short review of a named thing.

Runs anywhere with no downloads. Everything is generated deterministically from a seed.

The gold judge (`gold_score`) is what a reader would check at a glance:

    reviews should be positive, on topic, not repetitive, and end properly.

A response is a few sentences "the <aspect> was <adjective> ." and is scored sentence by sentence:
    +1  a new sentence about an aspect of the reviewed thing with a positive adjective
     0  ... with a neutral adjective
    -1  ... with a negative adjective
    -1  a sentence about an aspect of something else (off topic)
    -1  a sentence repeated from earlier in the response
    -1  a sentence that does not parse
    -1  a response that stops mid-sentence (does not end with " .")
    -2  an empty response
Each thing has four aspects, so the best score is +4.

The SFT demonstrations are of mixed quality (mixed sentiment, some off topic, some repeated,
some cut off), so a policy that imitates them sits near +1 and RLHF has room to improve.
Preference pairs come from the gold judge with Bradley-Terry label noise, like human raters.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

ASPECTS: dict[str, tuple[str, ...]] = {
    "pizza": ("crust", "sauce", "cheese", "toppings"),
    "movie": ("plot", "acting", "music", "ending"),
    "phone": ("screen", "battery", "speaker", "price"),
    "hotel": ("room", "staff", "breakfast", "location"),
    "book": ("story", "characters", "writing", "cover"),
    "game": ("graphics", "controls", "levels", "soundtrack"),
    "laptop": ("keyboard", "display", "speed", "fan"),
    "concert": ("band", "crowd", "venue", "lights"),
    "bike": ("brakes", "saddle", "gears", "frame"),
    "cafe": ("coffee", "cakes", "service", "chairs"),
}
POSITIVE = ("great", "excellent", "wonderful", "lovely", "superb")
NEGATIVE = ("awful", "terrible", "bland", "poor", "boring")
NEUTRAL = ("okay", "average")
SENTIMENT = {**{a: 1 for a in POSITIVE}, **{a: -1 for a in NEGATIVE}, **{a: 0 for a in NEUTRAL}}
FRAMES = (
    "write a review of the {item} {context} .",
    "review the {item} {context} .",
    "what did you think of the {item} {context} ?",
)
CONTEXTS = (
    "you had last week",
    "from the corner shop",
    "you tried yesterday",
    "your friend recommended",
    "in the city centre",
    "you bought online",
    "near the station",
    "everyone talks about",
    "from the new place",
    "you saw on sunday",
)
BEST_SCORE = 4.0

_ASPECT_OWNER = {aspect: item for item, aspects in ASPECTS.items() for aspect in aspects}
assert len(_ASPECT_OWNER) == sum(len(a) for a in ASPECTS.values()), "aspects must be unique across items"


def all_prompts() -> list[str]:
    """Every distinct prompt of the task (10 things x 3 frames x 10 contexts = 300)."""
    return [f.format(item=i, context=c) for i in ASPECTS for f in FRAMES for c in CONTEXTS]


def split_prompts(seed: int, eval_fraction: float = 0.2) -> tuple[list[str], list[str]]:
    """Deterministic train / held-out split of the prompts (held-out ones never appear in training)."""
    prompts = all_prompts()
    random.Random(seed).shuffle(prompts)
    n_eval = max(1, int(len(prompts) * eval_fraction))
    return prompts[n_eval:], prompts[:n_eval]


def item_of(prompt: str) -> str | None:
    words = prompt.split()
    return next((w for w in words if w in ASPECTS), None)


def sentence(aspect: str, adjective: str) -> str:
    return f"the {aspect} was {adjective} ."


# ----------------------------------------------------------------------------- the gold judge


def gold_score(prompt: str, response: str) -> float:
    """Score a response to a prompt by the rules in the module docstring (best: +4)."""
    item = item_of(prompt)
    text = response.strip()
    if not text:
        return -2.0
    score = 0.0
    parts = [p.strip() for p in text.split(" .")]
    *complete, tail = parts  # text ends with " ." exactly when tail == ""
    if tail:
        score -= 1  # stops mid-sentence
    seen: set[str] = set()
    for part in complete:
        words = part.split()
        if part in seen:
            score -= 1
            continue
        seen.add(part)
        if len(words) != 4 or words[0] != "the" or words[2] != "was" or words[3] not in SENTIMENT:
            score -= 1  # does not parse
        elif _ASPECT_OWNER.get(words[1]) != item:
            score -= 1  # off topic
        else:
            score += SENTIMENT[words[3]]
    return score


# ----------------------------------------------------------------------------- demonstrations


def demonstration(prompt: str, rng: random.Random) -> str:
    """One human-like review of mixed quality for `prompt`."""
    item = item_of(prompt)
    assert item is not None, prompt
    mood = rng.choice((0.15, 0.5, 0.85))  # the writer's overall P(positive)
    aspects = rng.sample(ASPECTS[item], k=rng.randint(1, 3))
    sentences = []
    for aspect in aspects:
        if rng.random() < 0.15:  # wanders off topic
            other = rng.choice([i for i in ASPECTS if i != item])
            aspect = rng.choice(ASPECTS[other])
        r = rng.random()
        adjective = rng.choice(NEUTRAL if r < 0.1 else POSITIVE if r < 0.1 + 0.9 * mood else NEGATIVE)
        sentences.append(sentence(aspect, adjective))
        if rng.random() < 0.15:  # repeats itself
            sentences.append(sentences[-1])
    text = " ".join(sentences)
    if rng.random() < 0.1:  # trails off
        text = text[: -len(" .")].rsplit(" ", 1)[0]
    return text


@dataclass(frozen=True)
class BuiltinPair:
    prompt: str
    chosen: str
    rejected: str
    # the label without rater noise: True when gold(chosen) > gold(rejected)
    gold_agrees: bool


def sft_examples(num: int, seed: int, prompts: list[str]) -> list[tuple[str, str]]:
    """`num` (prompt, demonstration) pairs, prompts drawn from `prompts`."""
    rng = random.Random(seed)
    out = []
    for _ in range(num):
        prompt = rng.choice(prompts)
        out.append((prompt, demonstration(prompt, rng)))
    return out


def preference_pairs(
    num: int, seed: int, prompts: list[str], rater_temperature: float = 1.0
) -> list[BuiltinPair]:
    """Pairs of demonstrations labelled by a noisy rater.

    The rater prefers a over b with probability sigmoid((gold(a) - gold(b)) / T), the
    Bradley-Terry model; pairs with equal gold scores are not drawn.
    """
    rng = random.Random(seed)
    pairs: list[BuiltinPair] = []
    while len(pairs) < num:
        prompt = rng.choice(prompts)
        a, b = demonstration(prompt, rng), demonstration(prompt, rng)
        ga, gb = gold_score(prompt, a), gold_score(prompt, b)
        if ga == gb:
            continue
        a_wins = rng.random() < 1.0 / (1.0 + math.exp(-(ga - gb) / rater_temperature))
        chosen, rejected = (a, b) if a_wins else (b, a)
        pairs.append(BuiltinPair(prompt, chosen, rejected, gold_agrees=(ga > gb) == a_wins))
    return pairs


def vocabulary() -> list[str]:
    """Every word the task can produce, in a fixed order."""
    words = {"the", "was", ".", "?"}
    words.update(ASPECTS, *ASPECTS.values(), SENTIMENT)
    for text in (*FRAMES, *CONTEXTS):
        words.update(w for w in text.replace("{item}", "").replace("{context}", "").split())
    return sorted(words)
