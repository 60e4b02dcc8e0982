"""IMDB pieces: cleaning, label-balanced disjoint splits, openings, same-opening pairs, the independent judge."""

import gzip
import json

import pytest

from data import imdb
from data.formats import DataError


def review(text: str, label: int, i: int = 0) -> imdb.Review:
    return imdb.Review(tuple(text.split()), label, f"r:{i}")


def test_clean_and_load(tmp_path):
    path = tmp_path / "r.jsonl.gz"
    rows = [{"text": "Great<br /><br />film.\u2028 Really", "label": 1}, {"text": "Bad  one", "label": 0}]
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    loaded = imdb.load_reviews(str(path))
    assert [r.words for r in loaded] == [("Great", "film.", "Really"), ("Bad", "one")]
    assert [r.label for r in loaded] == [1, 0] and loaded[1].source.endswith("r.jsonl.gz:2")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "x", "label": 3}) + "\n{not json\n" + json.dumps(rows[0]) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: .*label"):
        imdb.load_reviews(str(bad))
    # data.on_error=skip counts and skips the bad label and the malformed line, as for every other format
    kept = imdb.load_reviews(str(bad), on_error="skip")
    assert [(r.words, r.source) for r in kept] == [(("Great", "film.", "Really"), f"{bad}:3")]


def test_split_is_disjoint_balanced_and_seeded():
    reviews = [review(f"w{i} x y", i % 2, i) for i in range(200)]
    fractions = {"sft": 0.5, "reward": 0.3, "eval": 0.1}
    parts = imdb.split_reviews(reviews, fractions, seed=3)
    assert {k: len(v) for k, v in parts.items()} == {"sft": 100, "reward": 60, "eval": 20}
    assert all(sum(r.label for r in v) * 2 == len(v) for v in parts.values())  # half positive in each
    sources = [r.source for v in parts.values() for r in v]
    assert len(sources) == len(set(sources))  # disjoint
    assert parts == imdb.split_reviews(reviews, fractions, seed=3)
    assert parts != imdb.split_reviews(reviews, fractions, seed=4)
    with pytest.raises(DataError, match="sum to at most 1"):
        imdb.split_reviews(reviews, {"sft": 0.8, "reward": 0.3}, seed=0)


def test_openings_and_demonstrations():
    r = review("this movie was a true delight to watch", 1)
    assert imdb.opening(r, 3, 2) == ("this movie was", "a true")
    assert imdb.opening(r, 6, 4) is None  # too short
    assert imdb.demonstrations([r, review("too short", 0)], 3, 2) == [("this movie was", "a true")]


def test_pairs_share_the_opening_and_prefer_the_positive_review():
    reviews = [
        review("This movie was wonderful and moving", 1, 0),
        review("this movie was dull and far too long", 0, 1),
        review("This movie was superb in every way", 1, 2),
        review("I wanted to like it", 0, 3),  # no positive review opens like this: no pair
        review("I wanted to see it again", 0, 4),
    ]
    pairs = imdb.preference_pairs(reviews, prompt_words=3, response_words=3, seed=0, per_group=4)
    assert len(pairs) == 2  # 2 positives x 1 negative in the group: two distinct combinations
    assert {p.chosen for p in pairs} == {"wonderful and moving", "superb in every"}
    assert all(p.prompt[0].content == "This movie was" and p.rejected == "dull and far" for p in pairs)
    assert len(imdb.preference_pairs(reviews, 3, 3, seed=0, per_group=1)) == 1  # the cap per group
    assert imdb.preference_pairs(reviews, 3, 3, seed=0, per_group=0) == []


def test_judge_learns_sentiment_words_and_scores_probabilities():
    pos = ["a great film", "wonderful acting and a great story", "great fun", "wonderful"]
    neg = ["an awful film", "terrible acting and an awful story", "awful mess", "terrible"]
    judge = imdb.SentimentJudge(c=10.0).fit(pos * 5 + neg * 5, [1] * 20 + [0] * 20)
    probs = judge.positive_prob(["a great story", "an awful story"])
    assert probs[0] > 0.5 > probs[1]
    assert judge.accuracy(["great", "awful"], [1, 0]) == 1.0


def test_snippets_are_continuation_sized_windows():
    texts, labels = imdb.snippets(
        [review(" ".join(f"w{i}" for i in range(50)), 1)], words=10, per_review=3, seed=0
    )
    assert len(texts) == 3 and labels == [1, 1, 1] and all(len(t.split()) == 10 for t in texts)


def test_task_parts_feed_each_stage_from_disjoint_reviews(tmp_path):
    """data.format=imdb: demonstrations, pairs, rollout prompts, evaluation prompts and the judge's
    windows come from different reviews, with the settings of conf/data/imdb.yaml."""
    from omegaconf import OmegaConf

    words = {1: "great wonderful fine", 0: "awful dull poor"}
    rows = [{"text": f"Opening {i % 7} " + " ".join([words[i % 2]] * 4) + f" r{i}", "label": i % 2}
            for i in range(400)]  # fmt: skip
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = OmegaConf.load("conf/data/imdb.yaml").imdb
    cfg.response_words = 6
    convs = imdb.sft_conversations(str(path), cfg, "raise")
    pairs, eval_pairs = imdb.reward_pairs(str(path), cfg, eval_fraction=0.2, seed=0, on_error="raise")
    rollout = imdb.prompts(str(path), cfg, "ppo", "raise")
    held = imdb.prompts(str(path), cfg, "eval", "raise")
    assert len(convs) == 160 and convs[0].messages[0].content.startswith("Opening")  # 40 % of 400
    assert all(len(c.messages[1].content.split()) == 6 for c in convs)
    assert pairs and all("great" in p.chosen and "awful" in p.rejected for p in pairs + eval_pairs)
    # reviews recur across pairs, so eval pairs are split off by review: no eval continuation is trained on
    seen = {r for p in pairs for r in p.source.split("|")}
    assert eval_pairs and not seen & {r for p in eval_pairs for r in p.source.split("|")}
    for prompts in (rollout, held):  # 2-word openings "Opening k" (7 of them), deduplicated
        assert 5 <= len(prompts) == len(set(prompts)) <= 7 and all(
            p[0].content.startswith("Opening ") for p in prompts
        )
    parts = imdb.task_parts(str(path), cfg, "raise")
    ids = {name: {r.words[-1] for r in part} for name, part in parts.items()}
    assert all(not ids[a] & ids[b] for a in ids for b in ids if a < b)  # disjoint
    judge = imdb.fit_judge(str(path), cfg, "raise")
    assert judge.positive_prob(["great wonderful", "awful dull"])[0] > 0.5
    with pytest.raises(DataError, match="data=imdb"):
        imdb.task_parts(str(path), None, "raise")
    # the stage's data.on_error: a malformed line stops the task or is skipped
    spoilt = tmp_path / "spoilt.jsonl"
    spoilt.write_text(path.read_text() + "{not json\n")
    with pytest.raises(DataError, match="spoilt.jsonl:401: malformed JSON"):
        imdb.sft_conversations(str(spoilt), cfg, "raise")
    assert imdb.sft_conversations(str(spoilt), cfg, on_error="skip") == convs


@pytest.mark.shared_data
def test_judge_on_real_reviews(shared_data):
    """Fit on reviews kept from the reward model, scored on other reviews' 24-word windows."""
    reviews = imdb.load_reviews(str(shared_data / "imdb" / "train.jsonl.gz"))
    parts = imdb.split_reviews(reviews, {"judge": 0.2, "eval": 0.05}, seed=0)
    judge = imdb.SentimentJudge().fit(*imdb.snippets(parts["judge"], 24, 4, seed=0))
    # measured 0.69: a 24-word window of a review is often plot summary with no sentiment in it
    assert judge.accuracy(*imdb.snippets(parts["eval"], 24, 2, seed=1)) > 0.65
