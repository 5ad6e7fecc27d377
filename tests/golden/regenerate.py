"""
Rewrite the golden curves (tests/golden/curves.json) after a change that is meant to move
results, and say what moved:

    python tests/golden/regenerate.py            # rerun the pipeline, measure tolerances, rewrite
    python tests/golden/regenerate.py --pairs    # also resample the stored pairs from the new SFT model
    python tests/golden/regenerate.py --fixed_tolerances   # only remeasure the fixed curves' tolerances

A sampled curve's tolerance is 4 standard deviations across 5 training seeds (the golden run's
and 4 more), at the step where they spread most (and at least 5% of its largest value), so a
CPU that flips a sampled token stays inside it. A fixed curve's is a relative 1e-3 plus an
absolute one of its own: FIXED_MARGIN times the most it moved when SFT, DPO and the reward model
were rerun under each of ROUNDING_VARIANTS (other thread counts and CPU kernels, each in a
process of its own). Runs the pipeline 5 times and its fixed stages 4 more (14 minutes for the
first on a 2-core CPU that was running other jobs too).
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import pipeline  # noqa: E402
import sample  # noqa: E402
from files import write_atomic  # noqa: E402

EXTRA_SEEDS = 4
# What another machine's rounding does to a fixed curve: one thread and two (a sum split over
# threads adds in another order); ATen's kernels without vectorisation; AVX2 kernels in ATen and
# MKL, as an AMD or older Intel CPU runs them
ROUNDING_VARIANTS = [{"OMP_NUM_THREADS": "1"}, {"OMP_NUM_THREADS": "2"}, {"ATEN_CPU_CAPABILITY": "default"},
                     {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}]


def rounding_runs(root: str) -> list[dict]:
    """The fixed stages' curves under each of ROUNDING_VARIANTS, each run in a fresh process."""
    runs = []
    for i, env in enumerate(ROUNDING_VARIANTS):
        out = os.path.join(root, f"rounding{i}.json")
        code = (f"import json, sys; sys.path[:0] = [{ROOT!r}, {pipeline.GOLDEN_DIR!r}]; import pipeline; "
                f"json.dump(pipeline.run_fixed({os.path.join(root, f'rounding{i}')!r}), open({out!r}, 'w'))")
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **env}, check=True)
        with open(out) as f:
            runs.append(json.load(f))
    return runs


def fixed_tolerances(curves: dict, runs: list[dict]) -> dict[tuple[str, str], float]:
    """(stage, key) -> a fixed curve's absolute tolerance: FIXED_MARGIN x the most any rounding
    run moved it from `curves` at any logged step, and at least ATOL_FIXED."""
    out = {}
    for stage in pipeline.FIXED_STAGES:
        for key, points in curves[stage].items():
            if pipeline.kind(stage, key) == "fixed":
                moved = max(abs(dict(map(tuple, run[stage][key]))[step] - value)
                            for run in runs for step, value in points)
                out[stage, key] = max(pipeline.ATOL_FIXED, pipeline.FIXED_MARGIN * moved)
    return out


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
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", action="store_true",
                        help="resample pairs_train/val.jsonl from the new SFT model")
    parser.add_argument("--fixed_tolerances", action="store_true",
                        help="only rerun the fixed stages under ROUNDING_VARIANTS and rewrite the fixed "
                             "curves' tolerances; every curve's points are kept")
    args = parser.parse_args(argv)
    root = tempfile.mkdtemp(prefix="golden")
    try:
        if args.fixed_tolerances:
            with open(pipeline.CURVES) as f:
                golden = json.load(f)
            tolerance = fixed_tolerances({stage: {key: c["points"] for key, c in golden[stage].items()}
                                          for stage in pipeline.FIXED_STAGES}, rounding_runs(root))
            for (stage, key), value in tolerance.items():
                golden[stage][key]["tolerance"] = value
            write_atomic(pipeline.CURVES, json.dumps(golden, indent=1) + "\n")
            print(f"wrote the fixed curves' tolerances to {pipeline.CURVES}")
            return 0
        sft_ckpt = pipeline.run_sft(root)
        if args.pairs or not all(map(os.path.exists, pipeline.PAIRS.values())):
            assert sample.main([f"--ckpt={sft_ckpt}", "--pairs", f"--data_dir={root}/toy",
                                f"--out_dir={root}/pairs", "--n_train_prompts=100", "--n_val_prompts=16",
                                "--device=cpu"]) == 0
            for split, path in pipeline.PAIRS.items():
                shutil.copy(os.path.join(root, "pairs", f"pairs_{split}.jsonl"), path)
        pipeline.run_rest(root, f"{root}/toy", sft_ckpt)
        curves = pipeline.read_stages(root)
        varied = ["dpo", *pipeline.SAMPLED_STAGES]  # the stages with sampled curves (SFT's borrow DPO's tolerance)
        runs = [{stage: curves[stage] for stage in varied}]
        for s in range(1, EXTRA_SEEDS + 1):  # what a flipped sampled token can do: other seeds
            seed_root = os.path.join(root, f"seed{s}")
            pipeline.run_rest(seed_root, f"{root}/toy", sft_ckpt, seed=1337 + s, stages=varied)
            runs.append(pipeline.read_stages(seed_root, varied))
        spread = tolerances(runs)
        fixed = fixed_tolerances(curves, rounding_runs(root))
        golden = {stage: {key: {"kind": pipeline.kind(stage, key), "points": points,
                                "tolerance": spread.get((stage if stage != "sft" else "dpo", key))
                                if pipeline.kind(stage, key) == "sampled" else fixed[stage, key]}
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
