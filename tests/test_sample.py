"""Preference pairs from scored samples: pairing modes, ties, empty and cut completions, label noise.

    python -m pytest -q tests/test_sample.py
"""
import json
import math
import os
import random

import sample
from checkpoint import load_gpt
from data import load_prompts
from sample import make_pairs
from toy import gold_reward

COMPLETIONS = ["was great .", "was awful .", "was slow .", "was not bad . i loved it ."]
ENDED = [True] * 4


def scores():
    return [gold_reward(c, "the movie") for c in COMPLETIONS]  # sigmoid of 1, -1, 0, 2


def test_all_pairs_are_every_pair_labelled_by_the_higher_gold_reward():
    records, ties, empty, cut = make_pairs("the movie", COMPLETIONS, scores(), ENDED, "all", "gold", 1.0,
                                           random.Random(0))
    assert len(records) == 6 and ties == 0 and empty == 0 and cut == 0  # 4 * 3 / 2
    assert all(r["chosen_score"] > r["rejected_score"] for r in records)
    assert {(r["chosen"], r["rejected"]) for r in records} >= {("was not bad . i loved it .", "was awful .")}


def test_best_vs_rest_pairs_the_best_with_each_other():
    records, *_ = make_pairs("the movie", COMPLETIONS, scores(), ENDED, "best_vs_rest", "gold", 1.0,
                             random.Random(0))
    assert len(records) == 3 and {r["chosen"] for r in records} == {"was not bad . i loved it ."}


def test_ties_and_empty_completions_are_dropped_and_counted():
    completions = ["was great .", "was fun .", "", "was slow ."]
    s = [gold_reward(c) for c in completions]
    records, ties, empty, cut = make_pairs("p", completions, s, [True] * 4, "all", "gold", 1.0,
                                           random.Random(0))
    assert ties == 1 and empty == 3 and cut == 0  # great ~ fun tie; "" pairs with each of the other three
    assert len(records) == 2


def test_a_completion_cut_before_eos_is_never_in_a_pair():
    """It would be trained with an eos appended, an ending that was never sampled."""
    records, ties, empty, cut = make_pairs("the movie", COMPLETIONS, scores(), [True, False, True, True],
                                           "all", "gold", 1.0, random.Random(0))
    assert cut == 3 and ties == 0 and empty == 0 and len(records) == 3
    assert all("was awful ." not in (r["chosen"], r["rejected"]) for r in records)


def test_pairs_file_holds_only_completions_that_ended(sft_pairs, toy_dir, tmp_path):
    """With max_new_tokens 8 most samples are cut: every written response is one the policy
    ended with eos within 8 tokens, and the count is that of the pairs of ended completions."""
    ckpt, _ = sft_pairs
    assert sample.main([f"--ckpt={ckpt}", "--pairs", f"--data_dir={toy_dir}", f"--out_dir={tmp_path}",
                        "--n_train_prompts=64", "--n_val_prompts=8", "--max_new_tokens=8",
                        "--device=cpu"]) == 0
    with open(os.path.join(tmp_path, "pairs_train.jsonl")) as f:
        records = [json.loads(line) for line in f]
    model, tok = load_gpt(ckpt)
    prompts = load_prompts(os.path.join(toy_dir, "prompts_train.jsonl"))[:64]
    _, texts, ended = sample.sample_completions(model.eval(), tok, [p for p in prompts for _ in range(4)], 8,
                                                1.0, 0, batch_size=256)
    assert 0 < sum(ended) < len(ended) / 2  # the check means something: many cut, some ended
    expected = 0
    for i, p in enumerate(prompts):
        group = slice(4 * i, 4 * i + 4)
        expected += len(make_pairs(p, texts[group], [gold_reward(t, p) for t in texts[group]], ended[group],
                                   "all", "gold", 1.0, random.Random(0))[0])
    assert len(records) == expected > 0
    ended_texts = {t for t, e in zip(texts, ended) if e}
    assert all(r["chosen"] in ended_texts and r["rejected"] in ended_texts for r in records)


def test_bradley_terry_labels_flip_at_the_model_rate():
    """Net sentiment 1 against -1: the better one is chosen with probability sigmoid(2)."""
    rng, chosen_better, n = random.Random(0), 0, 4000
    for _ in range(n):
        (r,), *_ = make_pairs("p", ["was great .", "was awful ."],
                              [gold_reward("great"), gold_reward("awful")],
                              [True, True], "all", "bradley_terry", 1.0, rng)
        chosen_better += r["chosen"] == "was great ."
    assert abs(chosen_better / n - 1 / (1 + math.exp(-2))) < 0.02  # 0.881; 3 standard errors is 0.015


def test_a_split_without_a_single_pair_is_one_line_naming_why(sft_pairs, toy_dir, tmp_path, capsys):
    """Every completion cut at --max_new_tokens 1 (one token never ends with eos after a real
    token): no pair can be made, which is said by sample.py, status 2, rather than by the run
    that would read an empty file."""
    ckpt, _ = sft_pairs
    assert sample.main([f"--ckpt={ckpt}", "--pairs", f"--data_dir={toy_dir}", f"--out_dir={tmp_path}/pairs",
                        "--n_train_prompts=8", "--n_val_prompts=8", "--max_new_tokens=1", "--device=cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pairs_train.jsonl: no pairs from 8 prompts x 4 completions" in err[0], err
    assert "cut at --max_new_tokens 1" in err[0] and not os.path.exists(f"{tmp_path}/pairs/pairs_train.jsonl")
