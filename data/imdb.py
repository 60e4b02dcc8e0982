"""IMDB reviews (Maas et al. 2011) for positive-sentiment RLHF: splits, openings, pairs, an independent judge.

The classic public PPO demonstration (TRL's "gpt2-sentiment") steers a language model to continue
movie reviews positively. Here every stage gets its own reviews, so nothing the reward model saw
can leak into the judge that scores the result:

    sft     (prompt = the first words of a review, response = its continuation) demonstrations
    reward  preference pairs: two reviews that open with the same words, one positive and one
            negative; the positive one's continuation is preferred (the prompts are identical, so
            the only difference the reward model can learn is the continuation's sentiment)
    judge   reviews the independent judge (bag-of-words logistic regression) is fit on
    ppo     review openings for rollouts
    eval    held-out openings for the final evaluation (of reviews no stage saw; two-word openings
            repeat, so 336 of its 857 also open an SFT or PPO review)

Records: {"text", "label" (1 positive, 0 negative), "rating"} (`imdb/train.jsonl.gz`, 25 000 reviews).
With `data=imdb` (conf/data/imdb.yaml, `data.format=imdb`) each stage reads its part through the
task functions below: `sft_conversations`, `reward_pairs`, `prompts` (ppo / eval) and `fit_judge`.
"""

from __future__ import annotations

import collections
import functools
import random
import re
from dataclasses import dataclass
from typing import Any

from data.formats import Conversation, DataError, Message, PreferencePair, load_records

PARTS = ("sft", "reward", "judge", "ppo", "eval")
_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)


@dataclass(frozen=True)
class Review:
    words: tuple[str, ...]
    label: int  # 1 positive, 0 negative
    source: str  # file:line


def clean(text: str) -> str:
    """The review as plain running text: HTML line breaks removed, whitespace collapsed."""
    return " ".join(_BREAK.sub(" ", text).split())


def _review(row: Any, where: str) -> list[Review]:
    if not isinstance(row, dict) or not isinstance(row.get("text"), str) or row.get("label") not in (0, 1):
        raise DataError(f"{where}: expected a string 'text' and a 'label' of 0 or 1")
    return [Review(tuple(clean(row["text"]).split()), row["label"], where)]


def load_reviews(path: str, on_error: str = "raise") -> list[Review]:
    """Reviews from a file of {"text", "label"} records; `on_error="skip"` counts and skips bad lines
    (`data.on_error`, as for every other format)."""
    reviews, _ = load_records(path, "imdb", {"imdb": _review}, lambda row, where: "imdb", on_error=on_error)
    return reviews


def split_reviews(reviews: list[Review], fractions: dict[str, float], seed: int) -> dict[str, list[Review]]:
    """Disjoint parts (e.g. {"sft": 0.4, "reward": 0.3, ...}) of a seeded shuffle, each label-balanced."""
    if set(fractions) - set(PARTS) or sum(fractions.values()) > 1.0 + 1e-9:
        raise DataError(f"split fractions must name parts of {PARTS} and sum to at most 1; got {fractions}")
    parts: dict[str, list[Review]] = {name: [] for name in fractions}
    for label in (0, 1):  # the same share of each label in every part
        rows = [r for r in reviews if r.label == label]
        random.Random(seed + label).shuffle(rows)
        start = 0
        for name, fraction in fractions.items():
            end = start + int(round(fraction * len(rows)))
            parts[name] += rows[start:end]
            start = end
    for name in parts:
        random.Random(seed).shuffle(parts[name])
    return parts


def opening(review: Review, prompt_words: int, response_words: int) -> tuple[str, str] | None:
    """(the review's first prompt_words words, the next response_words), or None when it is too short."""
    if len(review.words) < prompt_words + response_words:
        return None
    w = review.words
    return " ".join(w[:prompt_words]), " ".join(w[prompt_words : prompt_words + response_words])


def demonstrations(reviews: list[Review], prompt_words: int, response_words: int) -> list[tuple[str, str]]:
    """(opening, continuation) of every review long enough."""
    return [o for r in reviews if (o := opening(r, prompt_words, response_words)) is not None]


def preference_pairs(reviews: list[Review], prompt_words: int, response_words: int, seed: int,
                     per_group: int = 4) -> list[PreferencePair]:  # fmt: skip
    """Positive-over-negative pairs of reviews that open with the same `prompt_words` words.

    Within each group of reviews sharing an opening (case-insensitive), up to `per_group` distinct
    (positive, negative) combinations are drawn at random, so a review can be in several pairs
    (same-opening groups are small: about 1 400 of 7 500 reviews would pair up one-to-one).
    The prompt is the positive review's opening as written.
    """
    groups: dict[str, tuple[list[Review], list[Review]]] = collections.defaultdict(lambda: ([], []))
    for r in reviews:
        if len(r.words) >= prompt_words + response_words:
            groups[" ".join(r.words[:prompt_words]).lower()][r.label].append(r)
    rng = random.Random(seed)
    pairs = []
    for key in sorted(groups):
        neg, pos = groups[key]
        combos = [(p, n) for p in pos for n in neg]
        for p, n in rng.sample(combos, min(per_group, len(combos))):
            prompt, chosen = opening(p, prompt_words, response_words)  # type: ignore[misc]
            _, rejected = opening(n, prompt_words, response_words)  # type: ignore[misc]
            pairs.append(
                PreferencePair((Message("user", prompt),), chosen, rejected, source=f"{p.source}|{n.source}")
            )
    rng.shuffle(pairs)
    return pairs


# ----------------------------------------------------------------------------- the task (data.format=imdb)


@functools.lru_cache(maxsize=2)
def _parts(path: str, fractions: tuple[tuple[str, float], ...], seed: int, on_error: str):
    return split_reviews(load_reviews(path, on_error), dict(fractions), seed)


def task_parts(path: str, cfg: Any, on_error: str) -> dict[str, list[Review]]:
    """The parts of the review file for a `data.imdb` config (the same split in every stage); `on_error` is
    the stage's `data.on_error`."""
    if cfg is None:
        raise DataError("data.format=imdb needs the data.imdb settings: use data=imdb (conf/data/imdb.yaml)")
    return _parts(str(path), tuple(sorted(dict(cfg.fractions).items())), cfg.seed, on_error)


def sft_conversations(path: str, cfg: Any, on_error: str) -> list[Conversation]:
    """SFT demonstrations: (opening, continuation) of every review of the sft part."""
    rows = demonstrations(task_parts(path, cfg, on_error)["sft"], cfg.prompt_words, cfg.response_words)
    return [Conversation((Message("user", p), Message("assistant", r)), f"imdb:sft:{i}")
            for i, (p, r) in enumerate(rows)]  # fmt: skip


def reward_pairs(
    path: str, cfg: Any, eval_fraction: float, seed: int, on_error: str
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, eval) reward-model pairs from the reward part (see `preference_pairs`).

    A review can be in several pairs, so the eval pairs are split off by review before pairing
    (eval_fraction of the reviews, label-balanced): no eval continuation is ever trained on.
    """
    reviews = task_parts(path, cfg, on_error)["reward"]
    split = split_reviews(reviews, {"reward": 1.0 - eval_fraction, "eval": eval_fraction}, seed)
    train, evals = (
        preference_pairs(split[part], cfg.prompt_words, cfg.response_words, cfg.seed, cfg.pairs_per_group)
        for part in ("reward", "eval")
    )
    return train, evals


def prompts(path: str, cfg: Any, part: str, on_error: str) -> list[tuple[Message, ...]]:
    """Review openings of a part ("ppo" for rollouts, "eval" held out from every stage), deduplicated."""
    seen: dict[str, None] = {}
    for r in task_parts(path, cfg, on_error)[part]:
        if (o := opening(r, cfg.prompt_words, cfg.response_words)) is not None:
            seen.setdefault(o[0], None)
    return [(Message("user", p),) for p in seen]


def fit_judge(path: str, cfg: Any, on_error: str) -> SentimentJudge:
    """The independent judge, fit on continuation-sized windows of the judge part."""
    judge_part = task_parts(path, cfg, on_error)["judge"]
    texts, labels = snippets(judge_part, cfg.response_words, cfg.judge_windows_per_review, cfg.seed)
    return SentimentJudge().fit(texts, labels)


# ----------------------------------------------------------------------------- the independent judge


def snippets(reviews: list[Review], words: int, per_review: int, seed: int) -> tuple[list[str], list[int]]:
    """Random `words`-word windows of each review with its label: texts the size of a continuation."""
    rng = random.Random(seed)
    texts, labels = [], []
    for r in reviews:
        for _ in range(per_review):
            start = rng.randint(0, max(0, len(r.words) - words))
            texts.append(" ".join(r.words[start : start + words]))
            labels.append(r.label)
    return texts, labels


class SentimentJudge:
    """Bag-of-words (unigrams and bigrams) logistic regression: P(positive | text).

    Fit on reviews the reward model never sees, on windows as long as the continuations it will
    judge; it shares no weights, tokenizer or training data with the reward model.
    """

    def __init__(self, c: float = 1.0):
        from sklearn.feature_extraction.text import CountVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline

        self.model = make_pipeline(
            CountVectorizer(ngram_range=(1, 2), min_df=2, binary=True, lowercase=True),
            LogisticRegression(C=c, max_iter=2000),
        )

    def fit(self, texts: list[str], labels: list[int]) -> SentimentJudge:
        self.model.fit(texts, labels)
        return self

    def positive_prob(self, texts: list[str]) -> list[float]:
        return self.model.predict_proba(texts)[:, 1].tolist()

    def accuracy(self, texts: list[str], labels: list[int]) -> float:
        return float(self.model.score(texts, labels))
