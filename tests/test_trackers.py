"""--report_to: TensorBoard's event files hold metrics.jsonl's rows (read back with TensorBoard's own
reader, offline); trackio and wandb get the same rows, the settings and the samples through their
APIs (stand-in modules that record the calls); a tracker that is not installed is one line."""
import importlib.machinery
import importlib.util
import json
import os
import sys
import types

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import checkpoint
import train_sft
from conftest import read_metrics
from test_train_sft import tiny_args


def events(out_dir: str) -> EventAccumulator:
    acc = EventAccumulator(os.path.join(out_dir, "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalars_by_step(acc: EventAccumulator) -> dict[int, dict[str, float]]:
    rows = {}
    for tag in acc.Tags()["scalars"]:
        for event in acc.Scalars(tag):
            assert event.step not in rows.get(event.step, {}) or tag not in rows[event.step], (tag, event.step)
            rows.setdefault(event.step, {})[tag] = event.value
    return rows


def numeric(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}


def assert_same_rows(scalars: dict, metrics: list[dict]) -> None:
    """Every metrics.jsonl row, and nothing else, at its step (TensorBoard keeps float32)."""
    assert sorted(scalars) == [row["step"] for row in metrics]
    for row in metrics:
        assert scalars[row["step"]] == pytest.approx(numeric(row), rel=1e-6, abs=1e-30), row["step"]


def test_tensorboard_events_hold_the_metrics_rows_the_config_and_the_samples(toy_dir, tmp_path):
    out = str(tmp_path / "run")
    assert train_sft.main(tiny_args(toy_dir, out, max_iters=6, log_interval=2, eval_interval=3, eval_samples=4,
                                    print_samples=2, max_new_tokens=6, report_to="tensorboard")) == 0
    metrics, acc = read_metrics(out), events(out)
    assert [row["step"] for row in metrics] == [0, 2, 3, 4, 6]  # training rows, evaluation rows and both
    assert_same_rows(scalars_by_step(acc), metrics)
    texts = {tag: [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(tag)]
             for tag in acc.Tags()["tensors"]}
    config = json.loads(texts["config/text_summary"][0][1].strip("`\n"))
    assert config == json.load(open(os.path.join(out, "config.json")))
    assert [step for step, _ in texts["samples/text_summary"]] == [0, 3, 6]  # where the script prints them
    assert all(text.count("\n\n") == 1 for _, text in texts["samples/text_summary"])  # two samples each


def test_a_resumed_run_purges_the_events_logged_after_its_checkpoint_and_overwrite_all(toy_dir, tmp_path, monkeypatch):
    """Interrupted at step 5, past the checkpoint of step 3: the resumed run redoes steps 4-5, and
    TensorBoard shows each step once, equal to metrics.jsonl and to an uninterrupted run's. A run
    that --overwrite starts in the folder hides all of the old one's."""
    args = dict(max_iters=8, log_interval=1, eval_interval=3, report_to="tensorboard")
    whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
    assert train_sft.main(tiny_args(toy_dir, whole, **args)) == 0
    log = checkpoint.Run.log

    def interrupted_after_step_5(self, step, metrics):
        log(self, step, metrics)
        if step == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.Run, "log", interrupted_after_step_5)
    assert train_sft.main(tiny_args(toy_dir, split, **args)) == 130
    assert max(scalars_by_step(events(split))) == 5  # the run's events reached past its checkpoint
    monkeypatch.setattr(checkpoint.Run, "log", log)
    assert train_sft.main(tiny_args(toy_dir, split, resume=True, **args)) == 0
    metrics = read_metrics(split)
    assert_same_rows(scalars_by_step(events(split)), metrics)
    assert metrics == read_metrics(whole)
    assert train_sft.main(tiny_args(toy_dir, split, overwrite=True, **{**args, "max_iters": 2})) == 0
    assert_same_rows(scalars_by_step(events(split)), read_metrics(split))  # the replaced run's events hidden


class Recorder(types.ModuleType):
    """A stand-in for trackio or wandb: their calls this project makes, recorded."""

    def __init__(self, name: str):
        super().__init__(name)
        self.__spec__ = importlib.machinery.ModuleSpec(name, None)  # found by importlib.util.find_spec
        self.calls = []
        recorder = self

        class Table:
            def __init__(self, columns, data):
                self.columns, self.data = columns, data

        class Run:
            def log(self, metrics, step):
                recorder.calls.append(("log", step, metrics))

            def finish(self):
                recorder.calls.append(("finish",))

        self.Table, self.run = Table, Run()

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))
        return self.run

    def log(self, metrics, step):
        self.run.log(metrics, step)

    def finish(self):
        self.run.finish()


@pytest.mark.parametrize("name", ["trackio", "wandb"])
def test_trackio_and_wandb_get_every_row_the_settings_and_one_run_across_a_resume(name, toy_dir, tmp_path,
                                                                                    monkeypatch):
    tracker = Recorder(name)
    monkeypatch.setitem(sys.modules, name, tracker)
    monkeypatch.setenv("TRACKIO_PROJECT" if name == "trackio" else "WANDB_PROJECT", "my-project")
    out = str(tmp_path / "run")
    args = dict(log_interval=1, eval_interval=2, eval_samples=2, print_samples=1, max_new_tokens=4, report_to=name)
    assert train_sft.main(tiny_args(toy_dir, out, max_iters=2, **args)) == 0
    assert train_sft.main(tiny_args(toy_dir, out, max_iters=4, resume=True, **args)) == 0
    inits = [call[1] for call in tracker.calls if call[0] == "init"]
    assert len(inits) == 2 and tracker.calls.count(("finish",)) == 2
    assert inits[0]["project"] == "my-project" and inits[0]["resume"] == "allow"
    assert inits[0]["config"] == json.load(open(os.path.join(out, "config.json")))
    run_id = "id" if name == "wandb" else "name"
    assert inits[0][run_id] == inits[1][run_id]  # the resumed run continues the same tracker run
    rows = [(step, metrics) for call, step, metrics in (c for c in tracker.calls if c[0] == "log")
            if "samples" not in metrics]
    assert rows == [(row["step"], numeric(row)) for row in read_metrics(out)]
    samples = [(step, m["samples"].data) for call, step, m in (c for c in tracker.calls if c[0] == "log")
               if "samples" in m]
    assert [step for step, _ in samples] == [0, 2, 4] and all(len(data) == 1 for _, data in samples)


def test_a_tracker_not_installed_is_one_line_and_nothing_is_written(toy_dir, tmp_path, monkeypatch, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    out = str(tmp_path / "run")
    assert train_sft.main(tiny_args(toy_dir, out, report_to="wandb")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --report_to wandb: the wandb package is not installed: pip install wandb, or leave "
                   "the flag out (metrics.jsonl is written either way)"]
    assert not os.path.exists(out)

