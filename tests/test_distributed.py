"""distributed.wrap_model: what it changes in the model besides placing it.

    python -m pytest -q tests/test_distributed.py
"""
import pytest

from conftest import CPU
from distributed import wrap_model
from model import GPT, GPTConfig
from ppo import PolicyAndCritic
from reward_model import RewardModel


@pytest.mark.parametrize("compile", [False, True])
def test_compiling_turns_packing_off_in_every_model_inside(compile):
    """A packed batch's row count varies with its sequences' lengths, and each new shape would
    be compiled again (a 4-step DPO run compiled for over 10 minutes with packing on, 43 s off)."""
    config = GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=1, n_embd=8)
    both = PolicyAndCritic(GPT(config), RewardModel(config))
    wrap_model(both, CPU, "float32", compile)
    assert [m.packing for m in both.modules() if isinstance(m, GPT)] == [not compile] * 2
