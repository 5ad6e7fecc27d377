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


def scores_both_ways(folder, ids, mask):
    """This project's reward model and transformers' of one folder, on one batch."""
    ours, _ = load_reward_model(folder)
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        return ours.eval()(ids, mask), theirs(input_ids=ids, attention_mask=mask).logits[:, 0]


def test_a_reward_model_trained_here_exports_as_a_sequence_classifier_transformers_scores_alike(
        sft_pairs, toy_dir, tmp_path):
    """train_rm.py's checkpoint (the toy GPT, written as GPT2ForSequenceClassification) and a
    downloaded Qwen3 reward model written back: transformers loads each and gives our scores."""
    import export
    import train_rm
    _, pairs = sft_pairs
    rm = tmp_path / "rm"
    assert train_rm.main([f"--sft_ckpt={sft_pairs[0]}", f"--train_file={pairs}/pairs_train.jsonl",
                          f"--val_file={pairs}/pairs_val.jsonl", f"--out_dir={rm}", "--device=cpu", "--max_iters=2",
                          "--batch_size=8", "--eval_interval=2", "--lr=1e-3", "--warmup_iters=0"]) == 0
    assert export.main([f"--ckpt={rm}/ckpt.pt", f"--out_dir={tmp_path}/rm_hf"]) == 0
    model, tok = load_reward_model(f"{rm}/ckpt.pt")
    texts = ["the plot was great . i loved it .", "a dull film ."]
    rows = [tok.encode_prompt(t) for t in texts]
    ids = torch.zeros(2, max(map(len, rows)), dtype=torch.long) + tok.pad_id
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):  # right-padded with the tokenizer's pad id
        ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
    with torch.no_grad():
        trained = model.eval()(ids, mask)
    exported, theirs = scores_both_ways(f"{tmp_path}/rm_hf", ids, mask)
    bias = float(model.head.proj.bias.detach())  # left out: transformers' score has no bias
    torch.testing.assert_close(exported, trained - bias, atol=1e-6, rtol=0)
    torch.testing.assert_close(theirs, trained - bias, atol=1e-4, rtol=0)
    assert json.load(open(f"{tmp_path}/rm_hf/config.json"))["architectures"] == ["GPT2ForSequenceClassification"]


def test_a_downloaded_reward_model_written_back_scores_alike(reward_folders, tmp_path):
    from hf import save_folder
    folder, reference = reward_folders["qwen3"]
    model, tok = load_reward_folder(folder)
    save_folder(model, tok, str(tmp_path))
    ids, mask, _ = padded_batch("right")
    ids = ids.masked_fill(mask == 0, 0)
    ours, theirs = scores_both_ways(str(tmp_path), ids, mask)
    with torch.no_grad():
        torch.testing.assert_close(theirs, reference(input_ids=ids, attention_mask=mask).logits[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    assert not os.path.exists(tmp_path / "generation_config.json")
