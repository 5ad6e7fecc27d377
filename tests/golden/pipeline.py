"""
The golden pipeline: the whole method at a tiny size (toy data, SFT, DPO and the reward model on
a stored pairs file, PPO, RLOO, GRPO and online DPO), a minute or two on a CPU. tests/test_golden.py reruns
it and compares every logged curve with tests/golden/curves.json; regenerate.py rewrites that
file and says what moved.

A curve is "fixed" when it is computed on fixed data (the toy corpus, the stored pairs): it moves
only through float rounding, so it is compared to a relative 1e-3 plus an absolute tolerance of
its own, measured under other thread counts and CPU kernels (see RTOL_FIXED). A curve is "sampled" when it
depends on sampled tokens (every evaluation's samples, every RL rollout): a CPU whose rounding
flips one draw sends it elsewhere, so it is compared within a tolerance measured across seeds.
"""
import json
import os

import train_dpo
import train_online_dpo
import train_ppo
import train_rm
import train_sft
from toy import ToyConfig, prepare_toy_data

GOLDEN_DIR = os.path.dirname(os.path.abspath(__file__))
PAIRS = {split: os.path.join(GOLDEN_DIR, f"pairs_{split}.jsonl") for split in ("train", "val")}
CURVES = os.path.join(GOLDEN_DIR, "curves.json")
SAMPLED_EVAL = {"eval/gold_reward", "eval/gold_reward_std", "eval/eos_rate", "eval/well_formed", "eval/kl",
                "eval/win_rate"}
RL_STAGES = ["ppo", "rloo", "grpo"]
SAMPLED_STAGES = [*RL_STAGES, "online_dpo"]  # every curve of theirs depends on sampled tokens
FIXED_STAGES = ["sft", "dpo", "rm"]  # every fixed curve is one of theirs
STAGES = [*FIXED_STAGES, *SAMPLED_STAGES]
RL_FLAGS = {"ppo": [], "rloo": ["--advantage=rloo", "--samples_per_prompt=4"],
            "grpo": ["--advantage=grpo", "--samples_per_prompt=4"]}


def kind(stage: str, key: str) -> str:
    """'sampled' for the curves that depend on sampled tokens, 'fixed' for the rest."""
    return "sampled" if stage in SAMPLED_STAGES or key in SAMPLED_EVAL else "fixed"


def read_curves(out_dir: str) -> dict[str, list[list[float]]]:
    """Every logged key of a run as [[step, value], ...]."""
    curves = {}
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        for row in map(json.loads, f):
            for key, value in row.items():
                if key != "step":
                    curves.setdefault(key, []).append([row["step"], value])
    return curves


def run_sft(root: str) -> str:
    """The toy task (in root/toy) and a short SFT run; returns the checkpoint."""
    data = os.path.join(root, "toy")
    prepare_toy_data(data, ToyConfig(), verbose=False)
    assert train_sft.main([f"--data_dir={data}", f"--out_dir={root}/sft", "--device=cpu", "--max_iters=80",
                           "--eval_interval=40", "--eval_samples=32", "--print_samples=0"]) == 0
    return os.path.join(root, "sft", "ckpt.pt")


def run_rest(root: str, data: str, sft_ckpt: str, seed: int = 1337, stages=("dpo", "rm", *SAMPLED_STAGES)) -> None:
    """DPO and the reward model on the stored pairs, then PPO, RLOO, GRPO and online DPO against the gold
    reward (the reward model's use is tested elsewhere; the gold reward keeps these runs independent of it)."""
    common = [f"--seed={seed}", "--device=cpu", f"--sft_ckpt={sft_ckpt}"]
    evaluation = [f"--eval_prompts={data}/prompts_val.jsonl", "--eval_samples=32", "--print_samples=0"]
    pairs = [f"--train_file={PAIRS['train']}", f"--val_file={PAIRS['val']}", "--batch_size=16",
             "--max_iters=20", "--eval_interval=10"]
    if "dpo" in stages:
        assert train_dpo.main([*common, *pairs, *evaluation, f"--out_dir={root}/dpo"]) == 0
    if "rm" in stages:
        assert train_rm.main([*common, *pairs, "--gold_eval=true", f"--out_dir={root}/rm"]) == 0
    rl = [f"--prompts={data}/prompts_train.jsonl", "--gen_chunk=16", "--max_iters=6", "--eval_interval=3",
          "--reward_norm_batches=1", "--reward=gold"]
    if "online_dpo" in stages:
        assert train_online_dpo.main([*common, *evaluation, *rl, f"--out_dir={root}/online_dpo", "--batch_size=16"]) == 0
    for stage in RL_STAGES:
        if stage in stages:
            assert train_ppo.main([*common, *evaluation, *RL_FLAGS[stage], f"--out_dir={root}/{stage}",
                                   *rl, "--batch_size=32"]) == 0


def run(root: str) -> dict[str, dict[str, list[list[float]]]]:
    """The whole golden pipeline in root; returns {stage: {key: [[step, value], ...]}}."""
    run_rest(root, os.path.join(root, "toy"), run_sft(root))
    return read_stages(root)


def run_fixed(root: str) -> dict[str, dict[str, list[list[float]]]]:
    """The stages that hold the fixed curves (SFT, DPO, the reward model) in root; their curves."""
    run_rest(root, os.path.join(root, "toy"), run_sft(root), stages=("dpo", "rm"))
    return read_stages(root, FIXED_STAGES)


def read_stages(root: str, stages=STAGES) -> dict[str, dict[str, list[list[float]]]]:
    """{stage: {key: [[step, value], ...]}} of the runs in root."""
    return {stage: read_curves(os.path.join(root, stage)) for stage in stages}


RTOL_FIXED, ATOL_FIXED, FIXED_MARGIN = 1e-3, 1e-5, 10
"""A fixed curve's tolerance at a point: RTOL_FIXED of its value, plus the curve's own absolute
tolerance (its "tolerance" in curves.json): FIXED_MARGIN times the most it moved when
regenerate.py reran it under other thread counts and CPU kernels, and at least ATOL_FIXED. A
relative tolerance alone means nothing near zero: DPO's implicit rewards start at 0 and are a
tenth of a difference of two log-probs near 20, so they move by rounding on the log-probs' scale,
not their own (1.6e-5 on an AMD EPYC, where 1e-5 + 1e-3 x 0.003 allowed 1.3e-5)."""


def out_of_tolerance(golden: dict, curves: dict) -> list[str]:
    """One line for every curve of `curves` that leaves the golden one's tolerance, or is missing
    or extra; empty when every curve agrees."""
    problems = []
    for stage, keys in golden.items():
        for key, g in keys.items():
            new = dict(map(tuple, curves.get(stage, {}).get(key, [])))
            if sorted(new) != [step for step, _ in g["points"]]:
                problems.append(f"{stage} {key}: logged at steps {sorted(new)}, "
                                f"golden {[s for s, _ in g['points']]}")
                continue
            worst = max(abs(new[step] - value) - (g["tolerance"] if g["kind"] == "sampled"
                                                  else (g["tolerance"] or ATOL_FIXED)
                                                  + RTOL_FIXED * abs(value))
                        for step, value in g["points"])
            if worst > 0:
                diffs = max(abs(new[step] - value) for step, value in g["points"])
                problems.append(f"{stage} {key} ({g['kind']}): moved by up to {diffs:.4g}, beyond its "
                                "tolerance")
        for key in set(curves.get(stage, {})) - set(keys):
            problems.append(f"{stage} {key}: logged but not in the golden file")
    return problems
