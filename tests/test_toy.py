"""toy.py: the toy task's files, splits and reward spread, the gold reward by hand, its grammar.

    python -m pytest -q tests/test_toy.py
"""
import filecmp
import math
import os

import pytest
import torch

from data import load_sft
from tokenizer import Tokenizer
from toy import ToyConfig, gold_reward, is_well_formed, prepare_toy_data


def test_toy_data_is_identical_for_a_seed_and_differs_for_another(toy_dir, tmp_path):
    again, other = str(tmp_path / "again"), str(tmp_path / "other")
    prepare_toy_data(again, ToyConfig(seed=0), verbose=False)
    prepare_toy_data(other, ToyConfig(seed=1), verbose=False)
    names = ["corpus.txt", "sft_train.jsonl", "sft_val.jsonl", "prompts_train.jsonl", "prompts_val.jsonl"]
    for name in names:
        assert filecmp.cmp(os.path.join(toy_dir, name), os.path.join(again, name), shallow=False)
        assert not filecmp.cmp(os.path.join(toy_dir, name), os.path.join(other, name), shallow=False)
    # the model file records its training file's path, so compare the vocabularies
    pieces = lambda d: [Tokenizer.load(os.path.join(d, "tokenizer.model")).sp.id_to_piece(i)
                        for i in range(512)]
    assert pieces(toy_dir) == pieces(again)


def test_toy_splits_are_disjoint_and_well_formed(toy_dir):
    train = load_sft(os.path.join(toy_dir, "sft_train.jsonl"))
    val = load_sft(os.path.join(toy_dir, "sft_val.jsonl"))
    assert len(train) == ToyConfig.n_sft_train and len(val) == ToyConfig.n_sft_val
    assert all(is_well_formed(f"{e.prompt} {e.completion}") for e in train + val)
    assert all(2 <= len(e.prompt.split()) <= 5 for e in train)
    overlap = {(e.prompt, e.completion) for e in train} & {(e.prompt, e.completion) for e in val}
    assert len(overlap) < len(val) // 10  # only short reviews can coincide by chance


def test_toy_completions_spread_over_the_reward_range(toy_dir):
    rewards = torch.tensor([gold_reward(e.completion, e.prompt)
                            for e in load_sft(os.path.join(toy_dir, "sft_train.jsonl"))])
    assert 0.4 < rewards.mean() < 0.6 and rewards.std() > 0.2
    assert (rewards < 0.2).float().mean() > 0.1 and (rewards > 0.8).float().mean() > 0.1


def test_gold_reward_by_hand():
    sig = lambda x: 1 / (1 + math.exp(-x))
    assert gold_reward("the movie was great .") == pytest.approx(sig(1))
    assert (gold_reward("i loved the plot . the music was awful . i would recommend it .")
            == pytest.approx(sig(1)))
    assert gold_reward("the movie was not great . i would not recommend it .") == pytest.approx(sig(-2))
    assert gold_reward("the plot was slow . i watched the film .") == 0.5
    assert gold_reward("") == 0.5
    # the prompt gives context but its words do not count
    assert gold_reward("dull .", prompt="the plot was not") == pytest.approx(sig(1))
    assert gold_reward("bad . the plot was dull .", prompt="i loved the film . the cast was not") == 0.5


def test_gold_reward_is_bounded_and_monotone():
    base = "the plot was slow ."
    assert gold_reward(base + " the cast was great .") > gold_reward(base)
    assert gold_reward(base + " the cast was awful .") < gold_reward(base)
    assert gold_reward(base + " the cast was not awful .") > gold_reward(base)
    extreme = " ".join(["the film was brilliant ."] * 60)
    assert 0 < gold_reward(extreme.replace("brilliant", "awful")) < 0.01 and 0.99 < gold_reward(extreme) <= 1


def test_well_formed_rejects_broken_grammar():
    assert is_well_formed("the film was truly superb . i hated the cast .")
    assert not is_well_formed("the film was trulyen .")
    assert not is_well_formed("the film was superb")  # no final period
    assert not is_well_formed("i loved the .")
