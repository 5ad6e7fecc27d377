"""Golden curves: the tiny pipeline of tests/golden/pipeline.py rerun, every logged curve compared
with the stored one (fixed-data curves to a relative 1e-3 plus an absolute tolerance measured
under other thread counts and CPU kernels, sampled ones within 4 standard deviations across
seeds). A change meant to move results regenerates them:
python tests/golden/regenerate.py

    python -m pytest -q tests/test_golden.py
"""
import json

import pytest

from golden import pipeline


@pytest.mark.slow
def test_every_logged_curve_matches_the_golden_run(tmp_path):
    with open(pipeline.CURVES) as f:
        golden = json.load(f)
    problems = pipeline.out_of_tolerance(golden, pipeline.run(str(tmp_path)))
    assert not problems, "\n".join(problems + ["if the change is meant to move these: "
                                               "python tests/golden/regenerate.py"])


def test_golden_file_covers_every_stage_and_both_kinds_of_curve():
    with open(pipeline.CURVES) as f:
        golden = json.load(f)
    assert set(golden) == {"sft", "dpo", "rm", "ppo", "rloo", "grpo", "online_dpo"}
    assert golden["dpo"]["loss"]["kind"] == "fixed" and golden["dpo"]["eval/gold_reward"]["kind"] == "sampled"
    sampled = [c["tolerance"] for keys in golden.values() for c in keys.values() if c["kind"] == "sampled"]
    assert all(t is not None and t >= 0 for t in sampled)
    assert golden["ppo"]["objective/kl"]["tolerance"] > 0  # seeds do spread a sampled curve
    for stage, keys in golden.items():  # a fixed curve's measured tolerance is rounding, far below the curve
        for key, c in keys.items():
            if c["kind"] == "fixed":
                scale = max(abs(v) for _, v in c["points"])
                assert (pipeline.ATOL_FIXED <= c["tolerance"]
                        <= max(pipeline.ATOL_FIXED, 0.1 * scale)), (stage, key)


def test_a_moved_curve_is_reported_and_a_float_rounding_one_is_not():
    """A fixed curve near zero (DPO's implicit reward, from 0 to 0.003) holds its own absolute
    tolerance: the 1.6e-5 another CPU's rounding moved it passes, a real change does not."""
    golden = {"dpo": {"loss": {"kind": "fixed", "tolerance": None, "points": [[0, 0.6931], [10, 0.5]]},
                      "rewards/chosen": {"kind": "fixed", "tolerance": 1.6e-4,
                                         "points": [[0, 0.0], [10, 0.003]]},
                      "eval/kl": {"kind": "sampled", "tolerance": 0.3, "points": [[0, 0.0], [10, 1.0]]}}}
    same = {"dpo": {"loss": [[0, 0.6931 * (1 + 1e-5)], [10, 0.5]],
                    "rewards/chosen": [[0, 1.6e-5], [10, 0.003016]],
                    "eval/kl": [[0, 0.0], [10, 1.25]]}}
    assert pipeline.out_of_tolerance(golden, same) == []
    moved = {"dpo": {"loss": [[0, 0.6931], [10, 0.502]], "rewards/chosen": [[0, 0.0], [10, 0.0034]],
                     "eval/kl": [[0, 0.0], [10, 1.4]], "extra": [[0, 1.0]]}}
    problems = pipeline.out_of_tolerance(golden, moved)
    assert len(problems) == 4 and problems[0].startswith("dpo loss (fixed)")
    assert problems[1].startswith("dpo rewards/chosen (fixed)") and "eval/kl (sampled)" in problems[2]
