"""Rewards from anywhere: downloaded reward models (transformers' XForSequenceClassification
folders) scored as transformers scores them, reward models exported for transformers, and the
refusals of folders that are not reward models.

    python -m pytest -q tests/test_rewards.py
"""
import json
import os
import shutil

import pytest
import torch
import transformers

from checkpoint import load_reward_model
from files import DataError
from hf import load_folder, load_reward_folder
from test_hf import CORPUS, FAMILIES, padded_batch, train_bpe_tokenizer_json, write_model

REWARD_FAMILIES = ["llama_gqa_untied", "qwen2", "qwen3", "gemma3", "gpt2"]


def write_reward_folder(folder, family: str, pad_token_id=0, seed=0):
    """A random transformers XForSequenceClassification with one label, its norms and biases moved
    off their initial values, and a byte-level tokenizer."""
    config = FAMILIES[family]()
    config.num_labels, config.pad_token_id = 1, pad_token_id
    model = write_model(folder, config, seed, auto=transformers.AutoModelForSequenceClassification)
    corpus = os.path.join(folder, "corpus.txt")
    with open(corpus, "w") as f:
        f.write("\n".join(CORPUS * 40))
    train_bpe_tokenizer_json(folder, corpus, bos_template=False)
    os.remove(corpus)
    return model


@pytest.fixture(scope="module")
def reward_folders(tmp_path_factory):
    out = {}
    for family in REWARD_FAMILIES:
        folder = str(tmp_path_factory.mktemp(f"rm_{family}"))
        out[family] = (folder, write_reward_folder(folder, family))
    return out


@pytest.mark.parametrize("family", REWARD_FAMILIES)
@pytest.mark.parametrize("pad_side", ["right", "left"])
def test_a_downloaded_reward_model_scores_as_transformers_does(reward_folders, family, pad_side):
    folder, reference = reward_folders[family]
    model, _ = load_reward_model(folder)  # as every script reads --reward_ckpt
    ids, mask, positions = padded_batch(pad_side)
    ids = ids.masked_fill(mask == 0, 0)  # pads carry the pad id, as a tokenizer's padding does
    with torch.no_grad():
        ours = model.eval()(ids, mask)
        theirs = reference(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, 0]
    assert theirs.abs().max() > 0.05
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_a_text_ending_in_the_pad_id_is_scored_before_it_as_transformers_does(reward_folders):
    """transformers reads the score at the last token that is not pad_token_id, a real one or not
    (where pad is also eos, a text ending in eos is scored at the token before it)."""
    folder, reference = reward_folders["qwen2"]
    model, _ = load_reward_model(folder)
    ids = torch.tensor([[5, 17, 42, 99, 0], [8, 21, 33, 7, 9]])
    with torch.no_grad():
        ours = model.eval()(ids, torch.ones_like(ids))
        theirs = reference(input_ids=ids).logits[:, 0]
        before = model(ids[:, :4], torch.ones_like(ids[:, :4]))
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    assert ours[0] == pytest.approx(before[0].item(), abs=1e-5)


def test_a_reward_folder_is_not_a_language_model_nor_the_other_way(reward_folders, tmp_path):
    folder, _ = reward_folders["qwen2"]
    with pytest.raises(DataError, match="a reward model .sequence classification., not a language model"):
        load_folder(folder)
    config = json.load(open(os.path.join(folder, "config.json")))
    bad = str(tmp_path / "two_labels")
    shutil.copytree(folder, bad)
    with open(os.path.join(bad, "config.json"), "w") as f:
        json.dump({**config, "id2label": {"0": "bad", "1": "good"}}, f)
    with pytest.raises(DataError, match="field 'id2label': a reward model scores with one label, not 2"):
        load_reward_folder(bad)
