"""The run folder under faults: one writer at a time (a second run is refused naming the holder, a
killed holder's lock is free), an --overwrite that keeps the old run until the new one's first
checkpoint, an --out_dir that cannot be written refused before anything is loaded, and kill -9 at
random moments never changing what the resumed run computes.

    python -m pytest -q tests/test_run_folder.py          # add -m "not slow" to skip the kill test
"""
import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import train_sft
from checkpoint import load_checkpoint
from conftest import ROOT, read_metrics
from test_train_sft import tiny_args

# train_sft.py, killed (SIGKILL, as the kernel's OOM killer or a lost node would) when it is about
# to write its first checkpoint
KILLED_AT_FIRST_SAVE = ("import os, signal, sys, checkpoint\n"
                        "checkpoint.Run.save = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
                        "import train_sft\n"
                        "sys.exit(train_sft.main(sys.argv[1:]))")


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "train_sft.py", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def wait_until(condition, proc, timeout: float = 120) -> bool:
    """True once condition() holds; False if proc (a Popen or a multiprocessing Process) ended first."""
    deadline = time.time() + timeout
    while not condition():
        if (proc.poll() if isinstance(proc, subprocess.Popen) else proc.exitcode) is not None:
            return False
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)
    return True


def logged_steps(out_dir: str) -> list[int]:
    """The steps of metrics.jsonl's whole lines (a line being written is skipped)."""
    try:
        with open(os.path.join(out_dir, "metrics.jsonl")) as f:
            text = f.read()
    except FileNotFoundError:
        return []
    steps = []
    for line in text.splitlines(keepends=True):
        try:
            steps.append(json.loads(line)["step"])
        except ValueError:
            pass
    return steps


def test_a_second_run_on_a_folder_in_use_is_refused_naming_the_holder_and_a_killed_holder_frees_it(
        toy_dir, tmp_path, capsys):
    out = str(tmp_path / "run")
    holder = start(tiny_args(toy_dir, out, max_iters=100000, eval_interval=5))
    try:
        assert wait_until(lambda: os.path.exists(os.path.join(out, "ckpt.pt")), holder), holder.stderr.read()
        config = open(os.path.join(out, "config.json")).read()
        for flag in ("overwrite", "resume"):
            assert train_sft.main(tiny_args(toy_dir, out, max_iters=1, **{flag: True})) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and err.startswith(f"error: --out_dir {out} is in use by another run "
                                                           f"(pid {holder.pid} on "), err
            assert "train_sft.py" in err
        assert open(os.path.join(out, "config.json")).read() == config
    finally:
        holder.kill()
        holder.wait()
    assert os.path.exists(os.path.join(out, ".lock"))  # left by the killed holder, whose flock died with it
    step = load_checkpoint(os.path.join(out, "ckpt.pt"))["step"]
    assert train_sft.main(tiny_args(toy_dir, out, max_iters=step + 1, eval_interval=5, resume=True)) == 0
    assert load_checkpoint(os.path.join(out, "ckpt.pt"))["step"] == step + 1
    assert not os.path.exists(os.path.join(out, ".lock"))  # a run that ends removes its lock


def test_a_kill_between_overwrite_and_the_first_checkpoint_leaves_the_old_run_loadable_and_resumable(
        toy_dir, tmp_path):
    out = str(tmp_path / "run")
    assert train_sft.main(tiny_args(toy_dir, out, max_iters=3)) == 0
    old_metrics, old = read_metrics(out), load_checkpoint(os.path.join(out, "ckpt.pt"))
    r = subprocess.run([sys.executable, "-c", KILLED_AT_FIRST_SAVE,
                        *tiny_args(toy_dir, out, max_iters=6, lr=1e-2, overwrite=True)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert os.path.isdir(os.path.join(out, ".overwritten"))  # the old config and metrics, set aside
    kept = load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert kept["step"] == 3 and all(torch.equal(t, kept["model"][n]) for n, t in old["model"].items())
    # the next run on the folder puts the old run's files back, and --resume continues the old run
    assert train_sft.main(tiny_args(toy_dir, out, max_iters=4, resume=True)) == 0
    assert json.load(open(os.path.join(out, "config.json")))["max_iters"] == 3
    assert read_metrics(out)[:len(old_metrics)] == old_metrics
    assert read_metrics(out)[-1]["step"] == 4 and ".overwritten" not in os.listdir(out)


def test_an_overwrite_stopped_before_its_first_checkpoint_leaves_the_old_run_byte_for_byte(
        toy_dir, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "run")
    assert train_sft.main(tiny_args(toy_dir, out, max_iters=3)) == 0
    before = {name: open(os.path.join(out, name), "rb").read() for name in sorted(os.listdir(out))}

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_sft, "evaluate", ctrl_c)  # the step-0 evaluation, before the first save
    capsys.readouterr()
    assert train_sft.main(tiny_args(toy_dir, out, max_iters=6, overwrite=True)) == 130
    assert "keeps the run --overwrite was replacing" in capsys.readouterr().err
    after = {name: open(os.path.join(out, name), "rb").read() for name in sorted(os.listdir(out))}
    assert after.keys() == before.keys()
    assert all(after[name] == before[name] for name in before)


def test_an_overwrite_that_reaches_its_first_checkpoint_leaves_only_the_new_run(toy_dir, tmp_path):
    """...and no temporary file that a writer killed mid-save left behind."""
    out = str(tmp_path / "run")
    assert train_sft.main(tiny_args(toy_dir, out, max_iters=3)) == 0
    open(os.path.join(out, "ckpt.pt.tmp99999"), "wb").write(b"half a checkpoint")
    assert train_sft.main(tiny_args(toy_dir, out, max_iters=2, overwrite=True)) == 0
    assert sorted(os.listdir(out)) == ["ckpt.pt", "config.json", "metrics.jsonl"]
    assert [row["step"] for row in read_metrics(out)] == [0, 1, 2]
    assert load_checkpoint(os.path.join(out, "ckpt.pt"))["step"] == 2


def test_an_out_dir_that_cannot_be_written_is_refused_before_anything_is_loaded(toy_dir, tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    out = str(tmp_path / "a_file" / "run")
    assert train_sft.main(tiny_args(toy_dir, out, init_from=str(tmp_path / "bad.pt"),
                                    train_file=f"{toy_dir}/sft_val.jsonl")) == 2
    assert capsys.readouterr().err == f"error: --out_dir {out}: cannot write there (Not a directory)\n"


@pytest.mark.parametrize("script", ["export", "sample"])
def test_export_and_sample_refuse_an_out_dir_that_cannot_be_written_before_loading(script, sft_pairs,
                                                                                   tmp_path, capsys):
    """export's checkpoint is never read; sample --pairs reads the toy model's record first (the
    toy task's gold reward labels only its samples), then refuses before loading the weights."""
    import export
    import sample
    (tmp_path / "a_file").write_text("")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    out = str(tmp_path / "a_file" / "out")
    ckpt = sft_pairs[0] if script == "sample" else tmp_path / "bad.pt"
    argv = ([f"--ckpt={ckpt}", f"--out_dir={out}"]
            + (["--pairs", "--device=cpu"] if script == "sample" else []))
    assert {"export": export, "sample": sample}[script].main(argv) == 2
    assert capsys.readouterr().err == f"error: --out_dir {out}: cannot write there (Not a directory)\n"


def test_bad_input_after_the_folder_is_claimed_leaves_no_folder_behind(toy_dir, tmp_path, capsys):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{")
    out = tmp_path / "run"
    assert train_sft.main(tiny_args(toy_dir, str(out), init_from=str(tmp_path / "model"),
                                    train_file=f"{toy_dir}/sft_train.jsonl")) == 2
    assert "config.json: invalid JSON" in capsys.readouterr().err and not out.exists()


def train_logging_stderr(argv: list[str], stderr: str) -> None:
    """train_sft.main in a child process, its stderr to a file and its status as the exit code."""
    with open(stderr, "w") as f:
        os.dup2(f.fileno(), 2)
    sys.exit(train_sft.main(argv))


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_ten_kills_at_random_moments_change_nothing_the_resumed_run_computes(signum, toy_dir, tmp_path):
    """kill -9 (the OOM killer, a lost node) ten times or SIGTERM (a scheduler's preemption) five
    times, each at a random moment (in a step, an evaluation or a checkpoint write), resuming after each:
    every checkpoint on disk loads, SIGTERM ends the run with status 143 and the line naming the
    last checkpoint, and the finished run's weights and metrics.jsonl equal an uninterrupted
    run's. Each kill comes 1-3 steps and a random fraction of a step past the last step logged
    before it, so ten kills advance at most ~45 of the 80 steps. The runs are processes forked
    from a server that has imported train_sft, to spare ten interpreter starts."""
    common = dict(max_iters=80, eval_interval=4, dropout=0.1, eval_samples=2, max_new_tokens=8,
                  lr_decay_iters=80)
    whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
    assert train_sft.main(tiny_args(toy_dir, whole, **common)) == 0
    processes = multiprocessing.get_context("forkserver")
    processes.set_forkserver_preload(["train_sft"])
    rng = random.Random(0)
    ckpt, stderr = os.path.join(killed, "ckpt.pt"), str(tmp_path / "stderr")
    for _ in range(10 if signum == signal.SIGKILL else 5):  # the SIGTERM path differs only in the handler
        resumed_from = load_checkpoint(ckpt)["step"] if os.path.exists(ckpt) else -1  # never half-written
        argv = tiny_args(toy_dir, killed, **common, **({"resume": True} if resumed_from >= 0 else {}))
        # past the steps logged before, which stay in metrics.jsonl until the resumed run has started
        kill_after = max(logged_steps(killed), default=-1) + rng.randint(1, 3)
        proc = processes.Process(target=train_logging_stderr, args=(argv, stderr))
        proc.start()
        assert wait_until(lambda: max(logged_steps(killed), default=-1) >= kill_after, proc)
        time.sleep(rng.uniform(0.0, 0.12))
        os.kill(proc.pid, signum)
        proc.join()
        if signum == signal.SIGKILL:
            assert proc.exitcode == -signal.SIGKILL, "the run ended before its kill"
            continue
        err = open(stderr).read()
        assert proc.exitcode == 128 + signal.SIGTERM, err
        step = load_checkpoint(ckpt)["step"]
        assert f"stopped by SIGTERM: the last checkpoint is {ckpt} (step {step}); continue with:" in err, err
        assert ("Traceback" not in err
                and sorted(os.listdir(killed)) == ["ckpt.pt", "config.json", "metrics.jsonl"])
    assert train_sft.main(tiny_args(toy_dir, killed, **common, resume=True)) == 0
    assert read_metrics(killed) == read_metrics(whole)
    a, b = load_checkpoint(os.path.join(whole, "ckpt.pt")), load_checkpoint(ckpt)
    assert all(torch.equal(t, b["model"][n]) for n, t in a["model"].items())
    assert sorted(os.listdir(killed)) == ["ckpt.pt", "config.json", "metrics.jsonl"]


def full_disk(max_bytes: int):
    """A child process's preexec_fn: files it writes stop at max_bytes, each write past that
    failing with EFBIG as a full disk fails with ENOSPC (SIGXFSZ ignored, so the write returns)."""
    def limit():
        import resource
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
    return limit


def test_a_full_disk_at_a_checkpoint_is_one_line_and_the_last_checkpoint_stands(toy_dir, tmp_path):
    """torch's writer raised a RuntimeError (inline_container.cc ... unexpected pos) past the
    OSError that Run._write caught: a traceback."""
    out = str(tmp_path / "run")
    assert train_sft.main(tiny_args(toy_dir, out, max_iters=2, eval_interval=2)) == 0
    checkpoint = open(os.path.join(out, "ckpt.pt"), "rb").read()
    r = subprocess.run([sys.executable, "train_sft.py", *tiny_args(toy_dir, out, max_iters=4, eval_interval=2,
                                                                   resume=True)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       preexec_fn=full_disk(len(checkpoint) // 2))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    err = next(line for line in r.stderr.splitlines() if line.startswith("error:"))  # beside the progress bar
    assert err.startswith(f"error: step 4: writing {out}/ckpt.pt failed (") and err.endswith(
        f"stopped, the last good checkpoint is {out}/ckpt.pt (step 2)"), err
    assert open(os.path.join(out, "ckpt.pt"), "rb").read() == checkpoint
    assert sorted(os.listdir(out)) == ["ckpt.pt", "config.json", "metrics.jsonl"]


def test_a_disk_too_full_for_the_lock_file_is_one_line_and_leaves_nothing(toy_dir, tmp_path):
    """Writing the lock's text raised an OSError traceback and left an empty .lock."""
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "train_sft.py", *tiny_args(toy_dir, str(out))], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, preexec_fn=full_disk(0))
    assert (r.returncode == 2
            and r.stderr == f"error: --out_dir {out}: cannot write there (File too large)\n"), r.stderr
    assert not out.exists()


def test_any_other_write_that_finds_the_disk_full_is_one_line(toy_dir, tmp_path, monkeypatch, capsys):
    """Here config.json, as the run starts: status 1, and the folder it made is gone again."""
    import errno
    import checkpoint

    def disk_full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(checkpoint, "write_atomic", disk_full)
    out = tmp_path / "run"
    assert train_sft.main(tiny_args(toy_dir, str(out))) == 1
    assert capsys.readouterr().err.endswith(f"\nerror: writing {out}/config.json failed (No space left "
                                            "on device); stopped before the first checkpoint, so "
                                            f"nothing in {out} to resume\n")
    assert not out.exists()
