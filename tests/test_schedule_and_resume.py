"""The optimisation a run settles where its flags are not given (the toy task's own, or for your
model the papers' and TRL's learning rate, one epoch and a warmup of a tenth), --epochs and
--warmup_ratio as steps; a run folder wherever a model is read; and `--out_dir X --resume` alone,
from the run's config.json, with a flag given on the command line overriding it in one line, or
refused where it would make the checkpoint another model's."""
import json
import math
import os
import re

import pytest
import torch

import checkpoint
import train_dpo
import train_online_dpo
import train_ppo
import train_rm
import train_sft
from conftest import CPU, read_metrics
from test_train_dpo import dpo_args
from test_train_sft import tiny_args
from test_your_model import write_user_files
from train_utils import _field_docs, parse_config, settle_steps

SCRIPTS = [train_sft, train_dpo, train_rm, train_ppo, train_online_dpo]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda m: m.__name__)
def test_each_scripts_help_names_the_two_learning_rates_it_settles(script):
    help_text = " ".join(_field_docs(script.Config)["lr"].split())
    toy, own = (float(re.search(rf"([0-9.e-]+) on {where}", help_text)[1]) for where in ("the toy task", "your own model"))
    assert (toy, own) == (script.TOY_SCHEDULE["lr"], script.OWN_MODEL_LR)


def test_the_toy_model_keeps_its_schedule_and_your_model_gets_trls_with_one_epoch(tmp_path, capsys):
    toy = parse_config(train_sft.Config, [])
    train_sft.settle_defaults(toy, CPU)
    assert (toy.lr, toy.min_lr, toy.max_iters, toy.warmup_iters, toy.epochs) == (2e-3, 2e-3 / 10, 1000, 50, None)
    folder = tmp_path / "model"  # any folder is a Hugging Face one, never the toy model; nothing is read here
    folder.mkdir()
    (tmp_path / "pairs.jsonl").write_text("")
    own = parse_config(train_dpo.Config, [f"--sft_ckpt={folder}", f"--train_file={tmp_path}/pairs.jsonl",
                                          "--batch_size=64"])
    train_dpo.settle_defaults(own, CPU)
    assert (own.lr, own.min_lr, own.epochs, own.warmup_ratio) == (1e-6, 1e-7, 1.0, 0.1)
    assert own.max_iters is None and own.warmup_iters is None  # they wait for the data's size
    assert "--lr 1e-06" in capsys.readouterr().out  # printed with the other settled values
    settle_steps(own, 1000, CPU)  # 1000 pairs at 64 a step: 15 whole steps; a tenth of them warms up
    assert (own.max_iters, own.warmup_iters) == (15, 2)
    assert "--max_iters 15, --warmup_iters 2" in capsys.readouterr().out
    toy_ckpt = tmp_path / "toy.pt"  # what is_toy_model reads of a stage's checkpoint: its record, not the path
    torch.save({"toy_task": True, "model": {}, "tokenizer": {}, "model_config": {"vocab_size": 1}}, toy_ckpt)
    half = parse_config(train_dpo.Config, [f"--sft_ckpt={toy_ckpt}", "--epochs=2.5", "--warmup_ratio=0.25",
                                           "--batch_size=64", "--lr=1e-3"])
    train_dpo.settle_defaults(half, CPU)
    settle_steps(half, 1000, CPU)  # the toy model: given values win; 2500 // 64 = 39 steps
    assert (half.lr, half.max_iters, half.warmup_iters) == (1e-3, 39, 10)


@pytest.mark.parametrize("flags, message", [
    (["--epochs=1", "--max_iters=10"], "--max_iters and --epochs say the same thing two ways: give one"),
    (["--warmup_iters=3", "--warmup_ratio=0.1"], "--warmup_iters and --warmup_ratio say the same thing"),
    (["--epochs=0"], "--epochs 0.0: must be a finite number above 0"),
    (["--warmup_ratio=1"], "--warmup_ratio 1.0: must be in [0, 1)"),
    (["--min_lr=0.01"], "--min_lr 0.01: above this run's learning rate, 0.002"),
])
def test_a_schedule_said_two_ways_or_out_of_range_is_one_line(flags, message, toy_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_sft.main([f"--data_dir={toy_dir}", f"--out_dir={out}", "--device=cpu", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_your_model_trains_one_epoch_at_trls_learning_rate_warmed_up_over_a_tenth(tmp_path):
    """SFT from a Qwen2-style folder with nothing but the data: 115 training conversations (6 of 121
    held out) at 16 a step are 7 steps, one warming up, at 2e-5 decaying to 2e-6."""
    write_user_files(tmp_path / "user")
    out = str(tmp_path / "sft")
    assert train_sft.main([f"--init_from={tmp_path}/user/model", f"--train_file={tmp_path}/user/sft.jsonl",
                           f"--out_dir={out}", "--device=cpu", "--batch_size=16", "--eval_samples=0",
                           "--log_interval=1"]) == 0
    config = json.load(open(os.path.join(out, "config.json")))
    assert (config["lr"], config["epochs"], config["max_iters"], config["warmup_iters"]) == (2e-5, 1.0, 7, 1)
    assert config["min_lr"] == pytest.approx(2e-6, rel=1e-12)
    lrs = [row["learning_rate"] for row in read_metrics(out) if "learning_rate" in row]
    cosine = [2e-6 + 0.5 * (1 + math.cos(math.pi * (s - 1) / 6)) * (2e-5 - 2e-6) for s in range(1, 7)]
    assert lrs == pytest.approx([2e-5] + cosine, rel=1e-9)
    # its config.json holds the settled steps beside --epochs: the folder alone resumes it, and --epochs 2
    # given then is settled again, to 14 steps
    assert train_sft.main([f"--out_dir={out}", "--resume"]) == 0
    assert train_sft.main([f"--out_dir={out}", "--resume", "--epochs=2"]) == 0
    assert [row["step"] for row in read_metrics(out)][-1] == 14


def interrupted_after(step: int, monkeypatch):
    log = checkpoint.Run.log

    def stop(self, at, metrics):
        log(self, at, metrics)
        if at == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.Run, "log", stop)


def test_out_dir_and_resume_alone_continue_the_run_as_it_was_started(toy_dir, tmp_path, monkeypatch, capsys):
    """Started with 9 flags, stopped at step 5 (checkpoint at 4): `--out_dir X --resume` takes the
    rest from config.json and ends as the uninterrupted run; --max_iters given then extends it, said
    in one line, and a run-defining flag that differs is refused."""
    flags = dict(max_iters=8, eval_interval=4, lr=1e-3, warmup_iters=2, dropout=0.1)
    whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
    assert train_sft.main(tiny_args(toy_dir, whole, **flags)) == 0
    interrupted_after(5, monkeypatch)
    assert train_sft.main(tiny_args(toy_dir, split, **flags)) == 130
    monkeypatch.undo()
    assert train_sft.main([f"--out_dir={split}", "--resume"]) == 0
    assert read_metrics(split) == read_metrics(whole)
    capsys.readouterr()
    assert train_sft.main([f"--out_dir={split}", "--resume", "--max_iters=10"]) == 0
    assert f"resuming {split} from step 8 with --max_iters 10 (was 8); its other settings as they were" \
        in capsys.readouterr().out
    assert json.load(open(os.path.join(split, "config.json")))["lr"] == 1e-3  # kept, not the default
    assert read_metrics(split)[-1]["step"] == 10
    before = {name: open(os.path.join(split, name), "rb").read() for name in os.listdir(split)}
    assert train_sft.main([f"--out_dir={split}", "--resume", "--preset=small", "--max_iters=12"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --preset small: the run in {split} was started with --preset tiny, which its "
                   "checkpoint holds the weights of (leave the flag out to resume it)"]
    json_path = os.path.join(split, "config.json")
    open(json_path, "w").write('{"lr": "fast"}')
    assert train_sft.main([f"--out_dir={split}", "--resume"]) == 2
    assert "config.json: not a run's settings as this project writes them" in capsys.readouterr().err
    open(json_path, "wb").write(before["config.json"])
    assert {name: open(os.path.join(split, name), "rb").read() for name in os.listdir(split)} == before


def test_a_run_folder_is_read_wherever_a_model_is(sft_pairs, toy_dir, tmp_path):
    """DPO given the SFT run's folder equals DPO given its ckpt.pt: the same reference, so the same
    metrics (with --precompute_ref, whose cache is keyed by the model's files)."""
    ckpt = sft_pairs[0]
    by_file, by_folder = str(tmp_path / "file"), str(tmp_path / "folder")
    assert train_dpo.main(dpo_args(sft_pairs, toy_dir, by_file, precompute_ref=True)) == 0
    assert train_dpo.main(dpo_args(sft_pairs, toy_dir, by_folder, precompute_ref=True,
                                   sft_ckpt=os.path.dirname(ckpt))) == 0
    assert read_metrics(by_folder) == read_metrics(by_file)
    assert checkpoint.fingerprint(os.path.dirname(ckpt)) == checkpoint.fingerprint(ckpt)
