"""LoRA in the training scripts (DPO's reference is the policy with its adapters off, the
checkpoint holds the adapters, resume, merged export = unmerged forward; 2 processes = 1 is in
test_parallel.py) and
the whole pipeline on the toy task as conversations, with and without LoRA.

    python -m pytest -q tests/test_train_lora_chat.py
"""
import math
import os

import pytest
import torch
import transformers

import export
import sample
import train_dpo
import train_ppo
import train_rm
import train_sft
from checkpoint import load_checkpoint
from checkpoint import load_gpt, load_trainable, trainable_state
from conftest import read_metrics, run_python
from files import DataError
from hf import load_folder
from lora import attach_lora
from test_train_dpo import dpo_args
from toy import ToyConfig, prepare_toy_data
from train_utils import prepare_trainable

LORA = dict(lora_rank=4, lora_alpha=8, lr=5e-3)


def test_dpo_with_adapters_off_as_reference_starts_at_ln2_and_saves_only_adapters(sft_pairs, toy_dir,
                                                                                  tmp_path):
    out = str(tmp_path)
    assert train_dpo.main(dpo_args(sft_pairs, toy_dir, out, eval_interval=3, **LORA)) == 0
    start, first_step = read_metrics(out)[0], read_metrics(out)[1]
    # a fresh adapter (B = 0) leaves the policy equal to the reference: loss ln 2, zero implicit rewards
    assert (start["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)
            and first_step["loss"] == pytest.approx(math.log(2), abs=1e-6))
    for k in ("eval/rewards/chosen", "eval/rewards/rejected", "rewards/chosen", "rewards/margins"):
        assert {**start, **first_step}[k] == 0.0, k
    assert read_metrics(out)[-1]["eval/rewards/margins"] != 0  # and the adapters did train
    ckpt = load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert ckpt["model"] and all(".lora_A." in k or ".lora_B." in k for k in ckpt["model"])
    n_adapter_tensors = len(ckpt["model"])
    assert len(ckpt["optimizer"]["state"]) == n_adapter_tensors  # the optimizer holds nothing else
    assert ckpt["lora"]["base"] == os.path.abspath(sft_pairs[0])


def test_merged_export_equals_the_unmerged_lora_forward(sft_pairs, toy_dir, tmp_path):
    out, folder = str(tmp_path / "dpo"), str(tmp_path / "hf")
    assert train_dpo.main(dpo_args(sft_pairs, toy_dir, out, **LORA)) == 0
    ckpt = load_checkpoint(os.path.join(out, "ckpt.pt"))
    unmerged = load_gpt(sft_pairs[0])[0]
    attach_lora(unmerged, ckpt["lora"]["rank"], ckpt["lora"]["alpha"], ckpt["lora"]["targets"])
    load_trainable(unmerged, ckpt["model"], "test")
    assert export.main([f"--ckpt={out}/ckpt.pt", f"--out_dir={folder}"]) == 0
    merged, _ = load_folder(folder)
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(4, 500, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = unmerged.eval()(ids)
        torch.testing.assert_close(merged.eval()(ids), expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(reference(ids).logits, expected, rtol=0, atol=1e-5)
        # the adapters count
        assert not torch.allclose(load_gpt(sft_pairs[0])[0].eval()(ids), expected, atol=1e-3)


def test_resumed_lora_run_equals_the_uninterrupted_one(sft_pairs, toy_dir, tmp_path):
    whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
    common = dict(eval_interval=2, lr_decay_iters=4, grad_checkpoint=True, **LORA)
    assert train_dpo.main(dpo_args(sft_pairs, toy_dir, whole, max_iters=4, **common)) == 0
    assert train_dpo.main(dpo_args(sft_pairs, toy_dir, split, max_iters=2, **common)) == 0
    assert train_dpo.main(dpo_args(sft_pairs, toy_dir, split, max_iters=4, resume=True, **common)) == 0
    assert read_metrics(split) == read_metrics(whole)


def test_frozen_weights_in_bfloat16_train_under_autocast_and_need_it(sft_pairs, toy_dir, tmp_path):
    cfg = train_dpo.Config(lora_rank=4, dtype="bfloat16", frozen_dtype="bfloat16", grad_checkpoint=True)
    model = prepare_trainable(load_gpt(sft_pairs[0])[0], cfg)
    assert model.grad_checkpoint
    # adapters: master weights
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}  # the frozen base
    for lora in ({}, LORA):
        out = str(tmp_path / f"run{len(lora)}")
        assert train_dpo.main(dpo_args(sft_pairs, toy_dir, out, max_iters=2, dtype="bfloat16",
                                       frozen_dtype="bfloat16", **lora)) == 0
        assert all(math.isfinite(m.get("loss", 0.0)) for m in read_metrics(out))
    r = run_python("train_dpo.py", *dpo_args(sft_pairs, toy_dir, str(tmp_path / "bad"),
                                             frozen_dtype="bfloat16"))
    assert r.returncode != 0 and "--frozen_dtype bfloat16 needs --dtype bfloat16" in r.stderr


# -----------------------------------------------------------------------------
# The chat toy task end to end


@pytest.fixture(scope="module")
def chat_pipeline(tmp_path_factory):
    """The toy task as conversations: SFT (full fine-tuning, 200 steps) and preference pairs
    sampled from it. Returns (folder of the task, SFT checkpoint, pairs folder)."""
    root = tmp_path_factory.mktemp("chat_pipeline")
    data_dir, sft_dir, pairs = str(root / "toy_chat"), str(root / "sft"), str(root / "pairs")
    prepare_toy_data(data_dir, ToyConfig(n_sft_train=6000, chat=True), verbose=False)
    assert train_sft.main([f"--data_dir={data_dir}", "--chat", f"--out_dir={sft_dir}", "--device=cpu",
                           "--max_iters=200", "--eval_interval=200", "--eval_samples=0",
                           "--print_samples=0"]) == 0
    ckpt = os.path.join(sft_dir, "ckpt.pt")
    assert load_checkpoint(ckpt)["tokenizer"]["chat_template"]  # the template travels with the checkpoint
    assert sample.main([f"--ckpt={ckpt}", "--pairs", f"--data_dir={data_dir}", f"--out_dir={pairs}",
                        "--n_train_prompts=400", "--n_val_prompts=64", "--device=cpu"]) == 0
    return data_dir, ckpt, pairs


def _pairs_args(chat_pipeline, out_dir, **overrides):
    data_dir, ckpt, pairs = chat_pipeline
    args = dict(sft_ckpt=ckpt, train_file=f"{pairs}/pairs_train.jsonl", val_file=f"{pairs}/pairs_val.jsonl",
                out_dir=out_dir, device="cpu", batch_size=32, print_samples=0)
    args.update(overrides)
    return [f"--{k}={v}" for k, v in args.items()]


def _gold_raised(out_dir, by: float):
    start, end = read_metrics(out_dir)[0], read_metrics(out_dir)[-1]
    assert start["eval/kl"] == 0 and start["eval/win_rate"] == 0.5
    assert end["eval/gold_reward"] > start["eval/gold_reward"] + by, (start["eval/gold_reward"],
                                                                      end["eval/gold_reward"])


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True])
def test_chat_sft_then_dpo_raises_the_gold_reward(chat_pipeline, tmp_path, lora):
    data_dir = chat_pipeline[0]
    extra = dict(lora_rank=8, lr=2e-3) if lora else dict(lr=2e-4)
    assert train_dpo.main(_pairs_args(chat_pipeline, str(tmp_path), max_iters=40, eval_interval=40,
                                      eval_samples=64, eval_prompts=f"{data_dir}/prompts_val.jsonl",
                                      **extra)) == 0
    _gold_raised(str(tmp_path), 0.04)


@pytest.mark.slow
def test_chat_sft_then_rm_then_ppo_with_lora_raises_the_gold_reward(chat_pipeline, tmp_path):
    """With LoRA adapters on reward model, critic and policy; full fine-tuning of the three on a
    chat template runs in tests/test_your_model.py (under 2 processes, on a Qwen2-style folder)."""
    data_dir = chat_pipeline[0]
    rm = str(tmp_path / "rm")
    assert train_rm.main(_pairs_args(chat_pipeline, rm, max_iters=80, eval_interval=80, batch_size=64,
                                     gold_eval=True, lr=3e-3, lora_rank=8)) == 0
    assert read_metrics(rm)[-1]["eval/gold_agreement"] > 0.6
    ppo = str(tmp_path / "ppo")
    assert train_ppo.main([f"--sft_ckpt={chat_pipeline[1]}", f"--reward_ckpt={rm}/ckpt.pt",
                           f"--out_dir={ppo}", f"--prompts={data_dir}/prompts_train.jsonl",
                           f"--eval_prompts={data_dir}/prompts_val.jsonl", "--device=cpu", "--max_iters=8",
                           "--eval_interval=8", "--eval_samples=64", "--print_samples=0",
                           "--lr=1e-3", "--lora_rank=8"]) == 0
    _gold_raised(ppo, 0.04)


def test_a_checkpoint_missing_a_trained_weight_is_refused_by_name(sft_pairs):
    model = attach_lora(load_gpt(sft_pairs[0])[0], 4, 8, ["q_proj", "v_proj"])
    state = trainable_state(model)
    assert state and all("lora_" in k for k in state)
    load_trainable(model, state, "ok")  # every trained weight present: loads
    missing = sorted(state)[0]
    with pytest.raises(DataError,
                       match=f"x: the checkpoint does not fit the model \\(missing \\['{missing}'\\]"):
        load_trainable(model, {k: v for k, v in state.items() if k != missing}, "x")
