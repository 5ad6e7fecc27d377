"""--resume on a run folder that is not what it should be: a checkpoint past --max_iters, another
script's run, a metrics log damaged before its last line, and a checkpoint damaged in any field a
resume reads. Each is one line, exit status 2, and the folder byte for byte as it was, unlocked.
And a model that is not numbers: NaN weights loaded by any script are one line (status 2), and a
run that diverges is one line naming its last good checkpoint, or saying there is none (status 1).

    python -m pytest -q tests/test_damaged_runs.py
"""
import os
import shutil
import subprocess
import sys

import pytest
import torch

import export
import sample
import train_dpo
import train_ppo
import train_sft
from conftest import ROOT, read_metrics
from test_train_dpo import dpo_args
from test_train_sft import tiny_args


def files(out_dir: str) -> dict[str, bytes]:
    return {name: open(os.path.join(out_dir, name), "rb").read() for name in sorted(os.listdir(out_dir))}


@pytest.fixture(scope="module")
def finished_once(toy_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("finished") / "run")
    assert train_sft.main(tiny_args(toy_dir, out, eval_interval=2)) == 0
    return out


@pytest.fixture
def finished(finished_once, tmp_path):
    """A finished 4-step SFT run, checkpointed at steps 2 and 4 (its optimizer has state): a copy."""
    return shutil.copytree(finished_once, str(tmp_path / "run"))


def refused(main, argv, out: str, capsys) -> str:
    """Run a script that must refuse: status 2, one line, the folder unchanged and unlocked."""
    before = files(out)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert files(out) == before
    return err


def test_a_resume_below_the_checkpoints_step_is_refused_not_run_past_it(toy_dir, finished, capsys):
    """The loops stop on step == max_iters: a resume from step 4 with --max_iters 2 ran on for ever,
    overwriting the finished checkpoint."""
    err = refused(train_sft.main, tiny_args(toy_dir, finished, max_iters=2, resume=True), finished, capsys)
    assert err == (f"error: --max_iters 2: the run in {finished} is at step 4 already; give --max_iters 4 or "
                   "more to continue it\n")


def test_a_run_folder_belongs_to_the_script_that_made_it(sft_pairs, toy_dir, finished, capsys):
    """DPO --resume on an SFT run replaced the SFT checkpoint with DPO weights, after a warning."""
    err = refused(train_dpo.main, dpo_args(sft_pairs, toy_dir, finished, resume=True), finished, capsys)
    assert f"{finished} holds a run of train_sft.py, not of train_dpo.py" in err


def test_a_checkpoint_written_before_the_script_record_is_judged_by_its_settings(sft_pairs, toy_dir,
                                                                                 finished, capsys):
    path = os.path.join(finished, "ckpt.pt")
    ckpt = torch.load(path, weights_only=True)
    del ckpt["script"]
    torch.save(ckpt, path)
    assert ("holds a run of another script (its settings include --chat, --data_dir, --dropout), "
            "not of train_dpo.py") in refused(
        train_dpo.main, dpo_args(sft_pairs, toy_dir, finished, resume=True), finished, capsys)
    assert train_sft.main(tiny_args(toy_dir, finished, max_iters=5, eval_interval=2, resume=True)) == 0


def test_a_damaged_metrics_line_before_the_last_is_refused_naming_it(toy_dir, finished, capsys):
    """A bad line in the middle made the resume keep the rows before it and drop the rest."""
    path = os.path.join(finished, "metrics.jsonl")
    lines = open(path).readlines()
    lines[2] = '{"step": 2, "loss"\n'
    open(path, "w").write("".join(lines))
    err = refused(train_sft.main, tiny_args(toy_dir, finished, max_iters=6, eval_interval=2, resume=True),
                  finished, capsys)
    assert err.startswith(f"error: {path}, line 3: not a metrics row")


def test_a_cut_last_metrics_line_is_dropped_and_the_rest_kept(toy_dir, finished):
    path = os.path.join(finished, "metrics.jsonl")
    whole = read_metrics(finished)
    open(path, "a").write('{"step": 5, "lo')  # a kill in the middle of a write
    assert train_sft.main(tiny_args(toy_dir, finished, max_iters=4, eval_interval=2, resume=True)) == 0
    assert read_metrics(finished) == whole


def wrong_width(ckpt):
    ckpt["model"] = {k: torch.zeros(*[d + 1 for d in v.shape]) for k, v in ckpt["model"].items()}


def wrong_moment(ckpt):
    state = next(iter(ckpt["optimizer"]["state"].values()))
    state["exp_avg"] = torch.zeros(3)


DAMAGE = {  # what is done to the checkpoint: the field the line must name
    "optimizer None": (lambda c: c.update(optimizer=None), "'optimizer' is missing at step 4"),
    "optimizer {}": (lambda c: c.update(optimizer={}), "the optimizer state is damaged"),
    "optimizer a list": (lambda c: c.update(optimizer=[1, 2]), "the optimizer state is damaged"),
    "optimizer keyed past the parameters": (
        lambda c: c["optimizer"]["param_groups"][0]["params"].append(10_000),
        "does not fit the model's parameters"),
    "an exp_avg of another shape": (wrong_moment, "exp_avg of"),
    "a model of another width": (wrong_width, "is not a floating-point tensor of shape"),
    "no step": (lambda c: c.pop("step"), "'step' is None"),
    "step a string": (lambda c: c.update(step="4"), "'step' is '4'"),
    "step negative": (lambda c: c.update(step=-1), "'step' is -1"),
    "step 10**18": (lambda c: c.update(step=10**18), "the run in"),
    "no config": (lambda c: c.pop("config"), "'config' is missing"),
    "garbage rng": (lambda c: c.update(rng=[{"cpu": torch.zeros(7, dtype=torch.uint8)}]),
                    "'rng' holds a state"),
    "rng not a list": (lambda c: c.update(rng="seed"), "'rng' is not a list"),
    "tokens missing": (lambda c: c.pop("tokens"), "'tokens' is not a count"),
    "model not a dict": (lambda c: c.update(model=[1]), "not a checkpoint this project wrote"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_is_refused_naming_what_is_wrong(damage, toy_dir, finished, capsys):
    """A resume used to start a fresh AdamW on a missing optimizer state, end in a KeyError or
    TypeError traceback, or crash the interpreter (an exp_avg of the wrong shape: the fused step
    writes out of bounds, status 139, the lock left behind; that case runs in a child process, so
    a crash is a failed test, not a lost test session)."""
    path = os.path.join(finished, "ckpt.pt")
    ckpt = torch.load(path, weights_only=True)
    change, expected = DAMAGE[damage]
    change(ckpt)
    torch.save(ckpt, path)
    argv = tiny_args(toy_dir, finished, max_iters=6, eval_interval=2, resume=True)
    if damage != "an exp_avg of another shape":
        assert expected in refused(train_sft.main, argv, finished, capsys)
        return
    before = files(finished)
    r = subprocess.run([sys.executable, "train_sft.py", *argv], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and expected in r.stderr, (r.returncode, r.stderr)
    assert files(finished) == before


def test_a_run_that_diverges_stops_in_one_line_naming_its_last_checkpoint(toy_dir, tmp_path, capsys):
    """--lr 1e39: the first update leaves finite weights whose logits overflow, and the next
    evaluation's sampling ended in an IndexError."""
    out = str(tmp_path / "run")
    assert train_sft.main(tiny_args(toy_dir, out, lr=1e39, eval_interval=1, eval_samples=2,
                                    max_new_tokens=4)) == 1
    err = capsys.readouterr().err
    assert (f"error: the model's next-token logits are NaN or infinite (its weights diverged); stopped, "
            f"the last good checkpoint is {out}/ckpt.pt (step 0)\n") in err and "Traceback" not in err


ATTENTION = "transformer.h.0.attn.c_attn.weight"


def with_weights(finished: str, tmp_path, scale: float) -> str:
    """A copy of the finished run's checkpoint with its first block's attention weights multiplied by
    scale."""
    ckpt = torch.load(os.path.join(finished, "ckpt.pt"), weights_only=True)
    ckpt["model"][ATTENTION] = ckpt["model"][ATTENTION] * scale
    path = str(tmp_path / "model.pt")
    torch.save(ckpt, path)
    return path


def test_a_diverged_model_stopping_before_its_first_checkpoint_says_there_is_none(toy_dir, finished,
                                                                                  tmp_path, capsys):
    """DPO said 'the last good checkpoint is kept' when it had written none."""
    model, out = with_weights(finished, tmp_path, 1e30), str(tmp_path / "diverged")
    assert train_sft.main(tiny_args(toy_dir, out, init_from=model, train_file=f"{toy_dir}/sft_val.jsonl",
                                    eval_samples=2, max_new_tokens=4)) == 1
    assert ("(its weights diverged); stopped before the first checkpoint, so nothing in "
            f"{out} to resume\n") in capsys.readouterr().err


@pytest.mark.parametrize("script", ["sample", "train_sft", "train_ppo", "export"])
def test_nan_weights_are_refused_in_one_line_by_every_script_that_loads_them(script, sft_pairs, toy_dir,
                                                                             finished, tmp_path, capsys):
    """sample.py, SFT --init_from and PPO --sft_ckpt ended in an IndexError from sampling, and
    export.py wrote the NaN weights out with status 0."""
    model, out = with_weights(finished, tmp_path, float("nan")), str(tmp_path / "out")
    argv = {"sample": ["--ckpt", model, "--prompt", "a", "--device=cpu"],
            "train_sft": tiny_args(toy_dir, out, init_from=model, train_file=f"{toy_dir}/sft_val.jsonl"),
            "train_ppo": [f"--sft_ckpt={model}", "--reward=gold", f"--prompts={toy_dir}/prompts_train.jsonl",
                          f"--out_dir={out}", "--device=cpu"],
            "export": [f"--ckpt={model}", f"--out_dir={out}"]}[script]
    main = {"sample": sample.main, "train_sft": train_sft.main, "train_ppo": train_ppo.main,
            "export": export.main}[script]
    assert main(argv) == 2
    assert capsys.readouterr().err == f"error: {model}: the weight {ATTENTION} holds NaN or infinite values\n"
    assert not os.path.exists(out) or not os.listdir(out)


def test_nan_weights_in_a_model_folder_are_refused_naming_the_folder(finished, tmp_path, capsys):
    from checkpoint import load_gpt
    model, tok = load_gpt(finished)
    with torch.no_grad():
        model.transformer.h[0].attn.c_attn.weight[0, 0] = float("inf")
    folder = str(tmp_path / "folder")
    export.save_folder(model, tok, folder)
    assert sample.main(["--ckpt", folder, "--prompt", "a", "--device=cpu"]) == 2
    assert capsys.readouterr().err == (f"error: {folder}: the weight {ATTENTION} holds NaN or infinite "
                                       "values\n")
