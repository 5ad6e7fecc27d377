"""DPO end to end on toy pairs: it learns, a precomputed reference equals a live one (2 DDP and 2
FSDP processes against 1: tests/test_parallel.py), and bad preference files stop train_dpo.py with one clear line.

    python -m pytest -q tests/test_train_dpo.py
"""
import math
import os
from contextlib import nullcontext

import pytest
import torch

import train_dpo
from checkpoint import load_checkpoint
from conftest import read_metrics, run_python
from distributed import Dist


def dpo_args(sft_pairs, toy_dir, out_dir, **overrides):
    ckpt, pairs = sft_pairs
    args = dict(sft_ckpt=ckpt, train_file=f"{pairs}/pairs_train.jsonl", val_file=f"{pairs}/pairs_val.jsonl",
                eval_prompts=f"{toy_dir}/prompts_val.jsonl", out_dir=out_dir, device="cpu", batch_size=16,
                max_iters=3, eval_interval=100, gold_eval=False, print_samples=0, log_interval=1)
    args.update(overrides)
    return [f"--{k}={v}" for k, v in args.items()]



@pytest.mark.slow
def test_short_dpo_run_learns_the_preferences_and_raises_gold_reward(sft_pairs, toy_dir, tmp_path):
    """120 steps of 32 pairs at beta 0.1: held-out reward accuracy above 0.6, and the mean gold
    reward of samples for 128 held-out prompts above the SFT model's (step 0 of the same run),
    by at least 0.05. Seen here: accuracy 0.79, gold reward 0.50 -> 0.68, KL 0.93, win rate 0.70."""
    assert train_dpo.main(dpo_args(sft_pairs, toy_dir, str(tmp_path), batch_size=32, max_iters=120,
                                   eval_interval=120, gold_eval=True, eval_samples=128)) == 0
    start, end = read_metrics(str(tmp_path))[0], read_metrics(str(tmp_path))[-1]
    assert start["eval/kl"] == 0 and start["eval/win_rate"] == 0.5  # policy = reference at step 0
    assert start["eval/loss"] == pytest.approx(0.6931, abs=1e-4)
    assert end["eval/rewards/accuracies"] > 0.6
    assert end["eval/gold_reward"] > start["eval/gold_reward"] + 0.05
    assert end["eval/win_rate"] > 0.5 and end["eval/kl"] > 0


def _final_weights(out_dir):
    return load_checkpoint(os.path.join(out_dir, "ckpt.pt"))["model"]


def test_precomputed_reference_trains_the_same_policy_as_a_live_one(sft_pairs, toy_dir, tmp_path):
    live, pre = str(tmp_path / "live"), str(tmp_path / "pre")
    assert train_dpo.main(dpo_args(sft_pairs, toy_dir, live)) == 0
    assert train_dpo.main(dpo_args(sft_pairs, toy_dir, pre, precompute_ref=True)) == 0
    assert os.path.exists(os.path.join(pre, "reference_logps.pt"))
    for a, b in zip(read_metrics(live), read_metrics(pre), strict=True):
        assert a.keys() == b.keys()
        for k in a:  # accuracies are a step function of margins that start at ~1e-7: float noise flips them
            if not k.endswith("accuracies"):
                assert a[k] == pytest.approx(b[k], abs=1e-5), k
    for name, tensor in _final_weights(live).items():
        torch.testing.assert_close(_final_weights(pre)[name], tensor, rtol=0, atol=1e-6)



def test_reference_cache_is_keyed_on_the_checkpoints_bytes_and_the_dtypes(tmp_path, monkeypatch):
    """The same checkpoint at a new mtime reuses the cached log-probs; other bytes, --dtype or
    --frozen_dtype compute them again."""
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes(b"weights")
    computed = []
    monkeypatch.setattr(train_dpo, "reference_logps", lambda reference, data, *_: computed.append(1) or torch.zeros(3, 2))
    pairs = {"train": {"chosen_input_ids": torch.arange(6).view(3, 2)}}

    def computes(**settings) -> bool:
        before = len(computed)
        cfg = train_dpo.Config(out_dir=str(tmp_path / "dpo"), sft_ckpt=str(ckpt), **settings)
        train_dpo.cached_reference_logps(cfg, None, pairs, Dist(False, 0, 0, 1, torch.device("cpu")), nullcontext())
        return len(computed) > before

    assert computes() and not computes()
    os.utime(ckpt, (1e9, 1e9))  # copied or touched: same contents, another mtime
    assert not computes()
    (tmp_path / "new.pt").write_bytes(b"w3ights")  # other contents, written as checkpoints are, the same mtime
    os.utime(tmp_path / "new.pt", (1e9, 1e9))
    os.replace(tmp_path / "new.pt", ckpt)
    assert computes() and not computes()
    assert computes(dtype="bfloat16") and computes(dtype="bfloat16", frozen_dtype="bfloat16")


@pytest.mark.parametrize("record, message", [
    ('{"prompt": "the movie", "chosen": "was great .", "rejected": "was great ."}', "field 'rejected': identical to 'chosen'"),
    ('{"prompt": "the movie", "chosen": "was great ."', "invalid JSON"),
    ('{"prompt": "the movie", "chosen": "was great .", "rejected": ["was bad ."]}', "field 'rejected': expected a string, got list"),
])
def test_bad_preference_file_stops_train_dpo_with_one_clear_line(record, message, sft_pairs, toy_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "the movie", "chosen": "was great .", "rejected": "was bad ."}\n' + record + "\n")
    out = tmp_path / "out"
    r = run_python("train_dpo.py", *dpo_args(sft_pairs, toy_dir, str(out), train_file=str(bad)))
    assert r.returncode == 2
    assert r.stderr == f"error: {bad}:2: {message}" + r.stderr[len(f"error: {bad}:2: {message}"):]
    assert r.stderr.count("\n") == 1
    assert not out.exists()


def test_resumed_dpo_run_equals_the_uninterrupted_one(sft_pairs, toy_dir, tmp_path):
    """With a precomputed reference too: the cache in the run dir is reused on resume."""
    whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
    common = dict(precompute_ref=True, eval_interval=2, lr_decay_iters=4)
    assert train_dpo.main(dpo_args(sft_pairs, toy_dir, whole, max_iters=4, **common)) == 0
    assert train_dpo.main(dpo_args(sft_pairs, toy_dir, split, max_iters=2, **common)) == 0
    cache = os.path.join(split, "reference_logps.pt")
    made = os.path.getmtime(cache)
    assert train_dpo.main(dpo_args(sft_pairs, toy_dir, split, max_iters=4, resume=True, **common)) == 0
    assert os.path.getmtime(cache) == made
    assert read_metrics(split) == read_metrics(whole)
    for name, tensor in _final_weights(whole).items():
        assert torch.equal(_final_weights(split)[name], tensor), name


@pytest.mark.parametrize("script", ["train_dpo.py", "train_rm.py"])
def test_preference_file_with_a_byte_order_mark_and_a_bad_byte_stops_on_that_line(script, sft_pairs, toy_dir, tmp_path):
    """Line 1 starts with a UTF-8 byte-order mark (accepted); line 2 holds a byte that is not UTF-8."""
    bad = tmp_path / "bad.jsonl"
    line = b'{"prompt": "the movie", "chosen": "was great .", "rejected": "was bad ."}'
    bad.write_bytes(b"\xef\xbb\xbf" + line + b"\n" + line[:14] + b"\xff" + line[14:] + b"\n")
    out = tmp_path / "out"
    ckpt, pairs = sft_pairs
    r = run_python(script, f"--sft_ckpt={ckpt}", f"--train_file={bad}", f"--val_file={pairs}/pairs_val.jsonl",
             f"--out_dir={out}", "--device=cpu")
    assert r.returncode == 2
    assert r.stderr == f"error: {bad}:2: invalid UTF-8 (byte 0xff at byte 15)\n"
    assert not out.exists()


def test_first_step_is_ln2_even_when_the_sft_model_has_dropout(sft_pairs, toy_dir, tmp_path):
    """Dropout is off in the DPO policy as in the reference, so policy = reference at step 0."""
    import train_sft
    sft = str(tmp_path / "sft")
    assert train_sft.main([f"--data_dir={toy_dir}", f"--out_dir={sft}", "--device=cpu", "--max_iters=2", "--dropout=0.3",
                           "--eval_interval=2", "--eval_samples=0", "--print_samples=0"]) == 0
    out = str(tmp_path / "dpo")
    assert train_dpo.main(dpo_args(sft_pairs, toy_dir, out, sft_ckpt=f"{sft}/ckpt.pt", max_iters=1)) == 0
    first = read_metrics(out)[1]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6) and first["rewards/margins"] == 0.0


@pytest.mark.parametrize("settings, message", [
    (dict(loss_type="robust", label_smoothing=0.5), "--label_smoothing 0.5 is not a label-flip rate in [0, 0.5)"),
    (dict(loss_type="sigmoid", label_smoothing=-0.1), "--label_smoothing -0.1 is not a label-flip rate"),
    (dict(loss_type="hinge", label_smoothing=0.1), "--label_smoothing applies to the sigmoid and robust losses; hinge ignores it"),
    (dict(loss_type="ipo", label_smoothing=0.1), "ipo ignores it"),
])
def test_loss_settings_that_cannot_work_are_refused_before_anything_is_written(settings, message, sft_pairs, toy_dir, tmp_path,
                                                                             capsys):
    assert train_dpo.main(dpo_args(sft_pairs, toy_dir, str(tmp_path / "out"), **settings)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
