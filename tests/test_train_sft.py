"""SFT training end to end: convergence on the toy task, resume equals an uninterrupted run, the
NaN guard, and clear errors on bad input through the command line (DDP and FSDP against one
process: tests/test_parallel.py).

    python -m pytest -q tests/test_train_sft.py          # add -m "not slow" to skip the runs
"""
import os

import pytest
import torch

import train_sft
from checkpoint import load_checkpoint
from conftest import read_metrics, run_python
from distributed import setup_distributed
from train_utils import parse_config


def tiny_args(toy_dir, out_dir, **overrides):
    args = dict(data_dir=toy_dir, out_dir=out_dir, device="cpu", batch_size=16, max_iters=4,
                eval_interval=100, eval_samples=0, print_samples=0, log_interval=1)
    args.update(overrides)
    return [f"--{k}={v}" for k, v in args.items()]



@pytest.mark.slow
def test_sft_learns_the_toy_task(toy_dir, tmp_path):
    """150 steps of 64 sequences: held-out loss from 6.2 (uniform over 512 pieces) to below 1.30,
    and at least 80% of sampled reviews parse in the toy grammar and end with eos."""
    metrics = train_sft.train(parse_config(train_sft.Config, tiny_args(
        toy_dir, str(tmp_path), batch_size=64, max_iters=150, eval_samples=64, log_interval=10)),
        setup_distributed("cpu"))
    first = read_metrics(str(tmp_path))[0]
    assert first["step"] == 0 and first["eval/loss"] > 6.0
    assert metrics["eval/loss"] < 1.30
    assert metrics["eval/well_formed"] >= 0.8
    assert metrics["eval/gold_reward_std"] > 0.15  # completions spread over the reward range


def test_resume_reproduces_the_uninterruptedrun_python(toy_dir, tmp_path):
    """12 steps in one run equal 6 steps plus 6 resumed ones: every metric and every weight.
    Dropout is on, so the RNG state has to come back too."""
    common = dict(dropout=0.1, eval_interval=6, eval_samples=4, max_new_tokens=8, lr_decay_iters=12)
    whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
    train_sft.main(tiny_args(toy_dir, whole, max_iters=12, **common))
    train_sft.main(tiny_args(toy_dir, split, max_iters=6, **common))
    train_sft.main(tiny_args(toy_dir, split, max_iters=12, resume=True, **common))
    assert read_metrics(split) == read_metrics(whole)
    a, b = load_checkpoint(os.path.join(whole, "ckpt.pt")), load_checkpoint(os.path.join(split, "ckpt.pt"))
    assert a["step"] == b["step"] == 12
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


def test_nonfinite_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(toy_dir, tmp_path, monkeypatch, capsys):
    calls = {"train": 0}
    real_loss = train_sft.sft_loss

    def loss_that_blows_up_on_step_3(model, batch):
        loss, metrics = real_loss(model, batch)
        if model.training:
            calls["train"] += 1
            if calls["train"] == 3:
                return loss * float("nan"), metrics
        return loss, metrics

    monkeypatch.setattr(train_sft, "sft_loss", loss_that_blows_up_on_step_3)
    assert train_sft.main(tiny_args(toy_dir, str(tmp_path), max_iters=10, eval_interval=2)) == 1
    # the message follows the progress bar's last refresh on stderr, hence a search, not a whole line
    assert (f"error: step 3: loss is nan; stopped, the last good checkpoint is {tmp_path}/ckpt.pt (step 2)\n"
            in capsys.readouterr().err)
    assert load_checkpoint(os.path.join(tmp_path, "ckpt.pt"))["step"] == 2
    assert max(m["step"] for m in read_metrics(str(tmp_path))) == 2


def test_a_finite_loss_with_an_overflowing_gradient_never_steps_and_never_reaches_a_checkpoint(toy_dir, tmp_path,
                                                                                                capsys):
    """lr 1e3 from step 1: the loss stays finite while the gradient norm overflows at step 2. The
    optimizer stepped on it, and the next evaluation saved a checkpoint of non-finite weights
    over the good one, while the message said the good one was kept."""
    val = tmp_path / "val.jsonl"
    val.write_text("".join(open(f"{toy_dir}/sft_val.jsonl").readlines()[:16]))
    out = tmp_path / "run"
    assert train_sft.main(tiny_args(toy_dir, str(out), max_iters=30, eval_interval=1, warmup_iters=1, lr=1e3,
                                    val_file=val)) == 1
    err = capsys.readouterr().err
    assert "gradient norm is" in err and f"stopped, the last good checkpoint is {out}/ckpt.pt (step " in err
    ckpt = load_checkpoint(str(out / "ckpt.pt"))
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
    assert ckpt["step"] == max(m["step"] for m in read_metrics(str(out)))


def test_a_half_written_metrics_line_does_not_stop_a_resume(toy_dir, tmp_path):
    """A full disk or a kill can leave half a line at the end of metrics.jsonl; resuming raised
    JSONDecodeError. It now keeps the valid prefix and ends with the uninterrupted run's metrics."""
    whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
    assert train_sft.main(tiny_args(toy_dir, whole, max_iters=4, eval_interval=2, lr_decay_iters=4)) == 0
    assert train_sft.main(tiny_args(toy_dir, split, max_iters=2, eval_interval=2, lr_decay_iters=4)) == 0
    with open(os.path.join(split, "metrics.jsonl"), "a") as f:
        f.write('{"step": 3, "loss": 5.')
    assert train_sft.main(tiny_args(toy_dir, split, max_iters=4, eval_interval=2, lr_decay_iters=4, resume=True)) == 0
    assert read_metrics(split) == read_metrics(whole)


def test_an_existing_run_is_not_overwritten_by_accident(toy_dir, tmp_path, capsys):
    train_sft.main(tiny_args(toy_dir, str(tmp_path), max_iters=1))
    capsys.readouterr()
    assert train_sft.main(tiny_args(toy_dir, str(tmp_path), max_iters=1)) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        parse_config(train_sft.Config, ["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in train_sft.Config.__dataclass_fields__:
        assert f"--{name}" in text
    assert "sequences (or pairs) per optimizer step, over all processes and micro-batches" in text



BAD_SFT = {
    "invalid_json": ('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n', r"bad.jsonl:2: invalid JSON"),
    "missing_field": ('{"prompt": "a"}\n', r"bad.jsonl:1: field 'completion': missing"),
    "empty_field": ('{"prompt": "a", "completion": "b"}\n{"prompt": "  ", "completion": "b"}\n', r"bad.jsonl:2: field 'prompt': empty"),
    "wrong_type": ('{"prompt": "a", "completion": 7}\n', r"bad.jsonl:1: field 'completion': expected a string, got int"),
}


@pytest.mark.parametrize("case", BAD_SFT)
def test_bad_sft_file_gives_one_clear_line_and_leaves_the_run_untouched(case, toy_dir, tmp_path, capsys):
    text, message = BAD_SFT[case]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(text)
    out = tmp_path / "out"
    out.mkdir()
    (out / "ckpt.pt").write_bytes(b"an earlier run")
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    assert train_sft.main([f"--train_file={bad}", f"--val_file={bad}", f"--out_dir={out}",
                           f"--tokenizer={toy_dir}/tokenizer.model", "--max_length=16", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert __import__("re").search(message, err), err
    assert (out / "ckpt.pt").read_bytes() == b"an earlier run"
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert sorted(os.listdir(out)) == ["ckpt.pt", "metrics.jsonl"]


def test_sft_file_with_a_byte_order_mark_and_a_bad_byte_stops_on_that_line(toy_dir, tmp_path):
    """Line 1 starts with a UTF-8 byte-order mark (accepted); line 2 holds a byte that is not UTF-8."""
    bad = tmp_path / "bad.jsonl"
    line = b'{"prompt": "the movie", "completion": "was great ."}'
    bad.write_bytes(b"\xef\xbb\xbf" + line + b"\n" + line[:14] + b"\xff" + line[14:] + b"\n")
    out = tmp_path / "out"
    r = run_python("train_sft.py", f"--train_file={bad}", f"--val_file={bad}", f"--out_dir={out}",
             f"--tokenizer={toy_dir}/tokenizer.model")
    assert r.returncode == 2
    assert r.stderr == f"error: {bad}:2: invalid UTF-8 (byte 0xff at byte 15)\n"
    assert not out.exists()


PLAIN = '{"prompt": "p", "chosen": "a", "rejected": "b"}'
HH = '{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: a", "rejected": "\\n\\nHuman: hi\\n\\nAssistant: b"}'
UF = '{"prompt": "p", "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}'
BAD_PREFERENCES = {  # a good first record fixes the format, the second is bad
    "identical": (PLAIN, '{"prompt": "p", "chosen": "same", "rejected": "same"}', "field 'rejected': identical to 'chosen'"),
    "missing": (PLAIN, '{"prompt": "p", "chosen": "x"}', "field 'rejected': missing"),
    "not_an_object": (PLAIN, '["p", "c", "r"]', "expected a JSON object, got list"),
    "hh_no_turn": (HH, '{"chosen": "\\n\\nHuman: hi", "rejected": "\\n\\nHuman: hi"}',
                   r"field 'chosen': no '\n\nAssistant:' turn"),
    "hh_different_prompts": (HH, '{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: a", '
                                 '"rejected": "\\n\\nHuman: yo\\n\\nAssistant: b"}', "field 'rejected': its conversation differs"),
    "uf_bad_message": (UF, '{"prompt": "p", "chosen": [{"role": "assistant"}], "rejected": []}', "field 'chosen[0]': expected"),
}


@pytest.mark.parametrize("case", BAD_PREFERENCES)
def test_bad_preference_file_gives_one_clear_line(case, tmp_path, capsys):
    """python data.py --check, in this process (its exit status through a shell: test_data.py)."""
    import data
    good, bad_record, message = BAD_PREFERENCES[case]
    path = tmp_path / "pairs.jsonl"
    path.write_text(f"{good}\n{bad_record}\n")
    assert data.main(["--check", str(path), "--kind", "preference"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}:2: {message}") and err.count("\n") == 1, err
    assert data.main(["--check", str(path), "--kind", "preference", "--skip_bad"]) == 0
    out, err = capsys.readouterr()
    assert "ok: 1 preference records" in out and "skipped 1 bad records" in err


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGHUP"])
def test_ctrl_c_names_the_last_checkpoint_and_the_command_that_resumes_it(signal_name, toy_dir, tmp_path):
    """SIGINT (what Ctrl-C sends) or SIGHUP (a closed terminal; SIGTERM: the kill test) during
    training: exit status 128 + the signal's number, no traceback, the last checkpoint's step and
    a resume command that runs."""
    import signal
    import subprocess
    import sys
    import time
    from conftest import ROOT
    out = tmp_path / "run"
    args = tiny_args(toy_dir, str(out), max_iters=100000, eval_interval=5)
    # SIGINT as a shell leaves it: a process started with SIGINT ignored (a disposition it inherits
    # from whatever started it, here the test process) never gets Python's KeyboardInterrupt
    proc = subprocess.Popen([sys.executable, "train_sft.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not (out / "ckpt.pt").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # into the steps after the checkpoint
    signum = getattr(signal, signal_name)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum and "Traceback" not in err, err
    step = load_checkpoint(str(out / "ckpt.pt"))["step"]
    what = "interrupted" if signal_name == "SIGINT" else f"stopped by {signal_name}"
    assert f"{what}: the last checkpoint is {out}/ckpt.pt (step {step}); continue with:" in err
    lines = err.splitlines()
    command = lines[next(i for i, line in enumerate(lines) if line.endswith("continue with:")) + 1].split()
    assert command == ["python", "train_sft.py", "--out_dir", str(out), "--resume"]  # its settings: config.json
    r = run_python(*command[1:], f"--max_iters={step + 1}")  # the printed command, one step more
    assert r.returncode == 0, r.stderr
    assert load_checkpoint(str(out / "ckpt.pt"))["step"] == step + 1
