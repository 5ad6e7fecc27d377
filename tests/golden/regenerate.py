"""
Rewrite the golden curves (tests/golden/curves.json) after a change that is meant to move
results, and say what moved:

    python tests/golden/regenerate.py            # rerun the pipeline, measure tolerances, rewrite
    python tests/golden/regenerate.py --pairs    # also resample the stored pairs from the new SFT model

A sampled curve's tolerance is 4 standard deviations across 5 training seeds (the golden run's
and 4 more), at the step where they spread most (and at least 5% of its largest value), so a
CPU that flips a sampled token stays inside it; a fixed curve's is a relative 1e-3. Runs the
pipeline 5 times (14 minutes on a 2-core CPU that was running other jobs too).
"""
import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import pipeline  # noqa: E402
import sample  # noqa: E402
from files import write_atomic  # noqa: E402

EXTRA_SEEDS = 4


def tolerances(runs: list[dict]) -> dict[tuple[str, str], float]:
    """(stage, key) -> 4 x the largest standard deviation across runs at any logged step, and at
    least 5% of the curve's largest value: a rate over 32 evaluation prompts that happened to
    agree across the seeds still moves by 1/32 when one token flips."""
    out = {}
    for stage, keys in runs[0].items():
        for key, points in keys.items():
            per_step = [[dict(map(tuple, run[stage][key]))[step] for run in runs] for step, _ in points]
            out[stage, key] = max(4 * max(statistics.stdev(values) for values in per_step),
                                  0.05 * max(abs(v) for values in per_step for v in values))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", action="store_true", help="resample pairs_train/val.jsonl from the new SFT model")
    args = parser.parse_args(argv)
    root = tempfile.mkdtemp(prefix="golden")
    try:
        sft_ckpt = pipeline.run_sft(root)
        if args.pairs or not all(map(os.path.exists, pipeline.PAIRS.values())):
            assert sample.main([f"--ckpt={sft_ckpt}", "--pairs", f"--data_dir={root}/toy", f"--out_dir={root}/pairs",
                                "--n_train_prompts=100", "--n_val_prompts=16", "--device=cpu"]) == 0
            for split, path in pipeline.PAIRS.items():
                shutil.copy(os.path.join(root, "pairs", f"pairs_{split}.jsonl"), path)
        pipeline.run_rest(root, f"{root}/toy", sft_ckpt)
        curves = pipeline.read_stages(root)
        varied = ["dpo", *pipeline.RL_STAGES]  # the stages with sampled curves (SFT's borrow DPO's tolerance)
        runs = [{stage: curves[stage] for stage in varied}]
        for s in range(1, EXTRA_SEEDS + 1):  # what a flipped sampled token can do: other seeds
            seed_root = os.path.join(root, f"seed{s}")
            pipeline.run_rest(seed_root, f"{root}/toy", sft_ckpt, seed=1337 + s, stages=varied)
            runs.append(pipeline.read_stages(seed_root, varied))
        spread = tolerances(runs)
        golden = {stage: {key: {"kind": pipeline.kind(stage, key), "points": points,
                                "tolerance": spread.get((stage if stage != "sft" else "dpo", key))
                                if pipeline.kind(stage, key) == "sampled" else None}
                          for key, points in keys.items()} for stage, keys in curves.items()}
        if os.path.exists(pipeline.CURVES):
            with open(pipeline.CURVES) as f:
                moved = pipeline.out_of_tolerance(json.load(f), curves)
            print("\n".join(["what moved against the previous golden curves:", *moved] if moved
                            else ["nothing moved beyond its tolerance"]))
        write_atomic(pipeline.CURVES, json.dumps(golden, indent=1) + "\n")
        print(f"wrote {pipeline.CURVES}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
