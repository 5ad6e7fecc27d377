"""Every setting and input is checked before anything is written: a bad one gets one line naming
its flag (or file), exit status 2, and no out dir; a user's own model or data never falls back on
the toy task's files.

    python -m pytest -q tests/test_settings.py
"""
import json

import pytest

import rollout
import train_dpo
import train_ppo
import train_rm
import train_sft
from conftest import read_metrics, run_python

MAINS = {"sft": train_sft.main, "dpo": train_dpo.main, "rm": train_rm.main, "ppo": train_ppo.main}

BAD = {  # case -> (script, flags, what the one line says)
    "batch_size 0": ("sft", ["--batch_size=0"], "--batch_size 0: must be at least 1"),
    "lr nan": ("sft", ["--lr=nan"], "--lr nan: must be a finite number above 0"),
    "dropout 1": ("sft", ["--dropout=1.0"], "--dropout 1.0: must be in [0, 1)"),
    "max_length above the context": ("sft", ["--max_length=1000"],
                                     "--max_length 1000 exceeds the model's context of 128"),
    "beta 0": ("dpo", ["--beta=0"], "--beta 0.0: must be a finite number above 0"),
    "batch larger than the data": ("dpo", ["--batch_size=100000"], "--batch_size 100000: more than the"),
    "batch not divisible": ("rm", ["--batch_size=6", "--grad_accum=4"],
                            "--batch_size 6: not divisible by 1 process(es) x --grad_accum 4"),
    "negative lr": ("rm", ["--lr=-1"], "--lr -1.0: must be a finite number above 0"),
    "missing pairs": ("dpo", ["--train_file=nope.jsonl"], "--train_file nope.jsonl: no such file or folder"),
    "missing sft data": ("sft", ["--train_file=nope.jsonl"],
                         "--train_file nope.jsonl: no such file or folder"),
    "max_new_tokens past the context": ("ppo", ["--max_new_tokens=200", "--reward=gold"],
                                        "--max_new_tokens 200 leaves no room for a prompt"),
    "ppo batch larger than the prompts": ("ppo", ["--batch_size=512", "--gen_chunk=32", "--reward=gold",
                                                  "--prompts={toy_dir}/prompts_val.jsonl"],
                                          "--batch_size 512: 512 prompts a step, more than the "
                                          "256 prompts"),
}


def script_args(name, sft_pairs, toy_dir, out):
    ckpt, pairs = sft_pairs
    common = [f"--out_dir={out}", "--device=cpu", "--max_iters=1"]
    if name == "sft":
        return [f"--data_dir={toy_dir}", *common]
    if name == "ppo":
        return [f"--sft_ckpt={ckpt}", f"--prompts={toy_dir}/prompts_train.jsonl", "--gold_eval=false",
                *common]
    return [f"--sft_ckpt={ckpt}", f"--train_file={pairs}/pairs_train.jsonl",
            f"--val_file={pairs}/pairs_val.jsonl", *common]


@pytest.mark.parametrize("case", BAD)
def test_a_bad_setting_is_one_line_naming_its_flag_and_no_out_dir(case, sft_pairs, toy_dir, tmp_path, capsys):
    name, flags, message = BAD[case]
    out = tmp_path / "out"
    args = script_args(name, sft_pairs, toy_dir, out)
    flags = [f.format(toy_dir=toy_dir) for f in flags]
    assert MAINS[name]([*[a for a in args if a.split("=")[0] not in {f.split("=")[0] for f in flags}],
                        *flags]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not out.exists()


def test_through_the_command_line_a_bad_setting_exits_2_without_a_traceback(sft_pairs, toy_dir, tmp_path):
    r = run_python("train_dpo.py", *script_args("dpo", sft_pairs, toy_dir, tmp_path / "out"), "--lr=nan")
    assert (r.returncode == 2 and "Traceback" not in r.stderr
            and r.stderr.strip() == "error: --lr nan: must be a finite number above 0")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("name", "flag"), [("sft", "--init_from"), ("dpo", "--sft_ckpt"),
                                            ("rm", "--sft_ckpt"), ("ppo", "--sft_ckpt")])
def test_a_hugging_face_model_never_reads_the_toy_tasks_files(name, flag, tmp_path, capsys):
    """With a model folder and no data flag, each script names the flag it needs instead of
    reading data/toy or out/pairs (the folder is empty: the refusal comes before any loading)."""
    folder = tmp_path / "model"
    folder.mkdir()
    out = tmp_path / "out"
    assert MAINS[name]([f"{flag}={folder}", f"--out_dir={out}", "--device=cpu"]) == 2
    needed = {"sft": "--train_file", "dpo": "--train_file", "rm": "--train_file", "ppo": "--prompts"}[name]
    err = capsys.readouterr().err
    assert err.startswith(f"error: {needed}: required with your own model") and not out.exists()


def test_your_pairs_without_a_val_file_hold_out_their_last_records_and_skip_the_toy_evaluation(
        sft_pairs, toy_dir, tmp_path, capsys):
    ckpt, pairs = sft_pairs
    mine = tmp_path / "mine.jsonl"
    records = [json.loads(line) for line in open(f"{pairs}/pairs_train.jsonl")][:200]
    mine.write_text("".join(json.dumps({k: r[k] for k in ("prompt", "chosen", "rejected")}) + "\n"
                            for r in records))
    out = tmp_path / "out"
    assert train_dpo.main([f"--sft_ckpt={ckpt}", f"--train_file={mine}", f"--out_dir={out}", "--device=cpu",
                           "--max_iters=1", "--batch_size=8", "--print_samples=0"]) == 0
    printed = capsys.readouterr().out
    assert "the last 10 of the 200 records of" in printed and "gold evaluation is off" in printed
    assert not any(k.startswith("eval/gold") for row in read_metrics(out) for k in row)
    assert json.load(open(out / "config.json"))["val_file"] == ""  # nothing from out/pairs


def test_ppo_prompts_longer_than_the_limit_keep_their_last_tokens(sft_pairs, toy_dir):
    from tokenizer import Tokenizer
    tok = Tokenizer.load(f"{toy_dir}/tokenizer.model")
    long = " ".join(["the movie was great ."] * 30)
    ids = rollout.encode_prompts(tok, ["the plot", long], limit=20, verbose=False)
    full = tok.encode_prompt(long)
    assert ids[0] == tok.encode_prompt("the plot")
    assert ids[1] == [tok.bos_id] + full[-19:] and len(ids[1]) == 20


def test_pairs_are_sampled_from_the_toy_model_only(tmp_path, capsys):
    """sample.py --pairs labels toy prompts with the toy gold reward, never a user's model's samples: those a judge labels."""
    import sample
    folder = tmp_path / "model"
    folder.mkdir()
    assert sample.main([f"--ckpt={folder}", "--pairs", f"--out_dir={tmp_path}/pairs", "--device=cpu"]) == 2
    assert "is not the toy task's model, whose gold reward labels toy samples; label yours with a judge" in (
        capsys.readouterr().err)
    assert not (tmp_path / "pairs").exists()
