"""
Experiment trackers, as TRL's trainers offer them: `--report_to tensorboard|trackio|wandb` sends
each metrics.jsonl row, under the same names at the same step, to one of them, with the run's
settings and the sample completions a script prints. metrics.jsonl stays the record every tool of
this project reads; a tracker is a view of it. The libraries are optional: each is imported only
when named, and one that is not installed is refused with one line before anything is written.

Where each one keeps a run:
- tensorboard: events in OUT_DIR/tensorboard (`tensorboard --logdir OUT_DIR`, or the study's folder
  for all its stages); a resumed run purges the events logged after its checkpoint (purge_step),
  as metrics.jsonl drops its rows;
- trackio: its local database (`trackio show`), project $TRACKIO_PROJECT;
- wandb: project $WANDB_PROJECT (WANDB_MODE=offline keeps it on disk, under OUT_DIR/wandb).
A run keeps one tracker id in its checkpoints, so a resumed run continues the same trackio or
wandb run; those two keep the rows a resume redoes (their steps repeat), TensorBoard does not.
"""
import importlib.util
import json
import numbers
import os

from files import DataError

TRACKERS = ("none", "tensorboard", "trackio", "wandb")
PACKAGE = {"tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb"}  # what pip installs
DEFAULT_PROJECT = "dpo-vs-rlhf"
_opened: list = []  # this process's open trackers, closed by close_trackers as a script's run ends


def check_tracker(report_to: str) -> None:
    """The tracker named is installed: checked with the settings, before anything is written."""
    if report_to != "none" and importlib.util.find_spec(report_to) is None:
        raise DataError(f"--report_to {report_to}: the {report_to} package is not installed: pip install "
                        f"{PACKAGE[report_to]}, or leave the flag out (metrics.jsonl is written either way)")


def _scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, numbers.Real) and not isinstance(v, bool)}


class Tracker:
    """--report_to none: the interface, doing nothing."""

    def log(self, step: int, metrics: dict) -> None:
        pass

    def samples(self, step: int, lines: list[str]) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoard(Tracker):
    def __init__(self, out_dir: str, config: dict, start_step: int):
        from torch.utils.tensorboard import SummaryWriter
        # purge_step: TensorBoard hides the events an interrupted run logged after its checkpoint, and
        # all of a run that --overwrite replaced
        purge_step = start_step + 1 if start_step else 0
        self.writer = SummaryWriter(os.path.join(out_dir, "tensorboard"), purge_step=purge_step)
        if not start_step:
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)

    def log(self, step, metrics):
        for name, value in _scalars(metrics).items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()  # a killed run keeps what it logged, as metrics.jsonl does

    def samples(self, step, lines):
        self.writer.add_text("samples", "\n\n".join(f"    {line}" for line in lines), step)

    def close(self):
        self.writer.close()


class Trackio(Tracker):
    def __init__(self, name: str, config: dict, run_id: str):
        import trackio
        self.trackio = trackio
        trackio.init(project=os.environ.get("TRACKIO_PROJECT", DEFAULT_PROJECT), name=f"{name}-{run_id}",
                     config=config, resume="allow")

    def log(self, step, metrics):
        self.trackio.log(_scalars(metrics), step=step)

    def samples(self, step, lines):
        self.trackio.log({"samples": self.trackio.Table(columns=["sample"], data=[[s] for s in lines])}, step=step)

    def close(self):
        self.trackio.finish()


class Wandb(Tracker):
    def __init__(self, out_dir: str, name: str, config: dict, run_id: str):
        import wandb
        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", DEFAULT_PROJECT), name=name, id=run_id,
                              resume="allow", config=config, dir=out_dir)

    def log(self, step, metrics):
        self.run.log(_scalars(metrics), step=step)

    def samples(self, step, lines):
        self.run.log({"samples": self.wandb.Table(columns=["sample"], data=[[s] for s in lines])}, step=step)

    def close(self):
        self.run.finish()


def open_tracker(report_to: str, out_dir: str, config: dict, start_step: int, run_id: str) -> Tracker:
    """The tracker of a run in out_dir starting at start_step (0, or the step it resumes from);
    run_id is the one its checkpoints keep, so a resume continues the same tracker run."""
    name = os.path.normpath(out_dir)  # TRL's run_name default: the output folder
    if report_to == "tensorboard":
        tracker = TensorBoard(out_dir, config, start_step)
    elif report_to == "trackio":
        tracker = Trackio(name, config, run_id)
    elif report_to == "wandb":
        tracker = Wandb(out_dir, name, config, run_id)
    else:
        return Tracker()
    _opened.append(tracker)
    return tracker


def close_trackers() -> None:
    """Close what open_tracker opened in this process, however the run ended (scripts.run_script)."""
    while _opened:
        _opened.pop().close()
