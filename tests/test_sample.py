"""Preference pairs from scored samples: pairing modes, ties, empty completions, label noise.

    python -m pytest -q tests/test_sample.py
"""
import math
import random

from data import gold_reward
from sample import make_pairs

COMPLETIONS = ["was great .", "was awful .", "was slow .", "was not bad . i loved it ."]


def scores():
    return [gold_reward(c, "the movie") for c in COMPLETIONS]  # sigmoid of 1, -1, 0, 2


def test_all_pairs_are_every_pair_labelled_by_the_higher_gold_reward():
    records, ties, empty = make_pairs("the movie", COMPLETIONS, scores(), "all", "gold", 1.0, random.Random(0))
    assert len(records) == 6 and ties == 0 and empty == 0  # 4 * 3 / 2
    assert all(r["chosen_score"] > r["rejected_score"] for r in records)
    assert {(r["chosen"], r["rejected"]) for r in records} >= {("was not bad . i loved it .", "was awful .")}


def test_best_vs_rest_pairs_the_best_with_each_other():
    records, _, _ = make_pairs("the movie", COMPLETIONS, scores(), "best_vs_rest", "gold", 1.0, random.Random(0))
    assert len(records) == 3 and {r["chosen"] for r in records} == {"was not bad . i loved it ."}


def test_ties_and_empty_completions_are_dropped_and_counted():
    completions = ["was great .", "was fun .", "", "was slow ."]
    s = [gold_reward(c) for c in completions]
    records, ties, empty = make_pairs("p", completions, s, "all", "gold", 1.0, random.Random(0))
    assert ties == 1 and empty == 3  # great ~ fun tie; "" pairs with each of the other three
    assert len(records) == 2


def test_bradley_terry_labels_flip_at_the_model_rate():
    """Net sentiment 1 against -1: the better one is chosen with probability sigmoid(2)."""
    rng, chosen_better, n = random.Random(0), 0, 4000
    for _ in range(n):
        (r,), _, _ = make_pairs("p", ["was great .", "was awful ."], [gold_reward("great"), gold_reward("awful")],
                                "all", "bradley_terry", 1.0, rng)
        chosen_better += r["chosen"] == "was great ."
    assert abs(chosen_better / n - 1 / (1 + math.exp(-2))) < 0.02  # 0.881; 3 standard errors is 0.015
