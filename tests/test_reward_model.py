"""reward_model.py: the Bradley-Terry loss by hand, the score read at the last real token whatever
the padding, and a gradient for every trainable weight of a reward model and a critic.

    python -m pytest -q tests/test_reward_model.py
"""
import math

import pytest
import torch

from model import GPT, GPTConfig
from ppo import PolicyAndCritic
from reward_model import RewardModel, ScalarHead, bradley_terry_loss


def test_bradley_terry_loss_by_hand():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    # -log sigmoid(d) = log(1 + e^-d): d = 1 and d = -1
    expected = [math.log(1 + math.exp(-1)), math.log(1 + math.exp(1))]  # 0.31326, 1.31326
    assert bradley_terry_loss(chosen, rejected).tolist() == pytest.approx(expected, abs=1e-6)
    assert bradley_terry_loss(chosen, rejected, margin=0.5).tolist() == pytest.approx(
        [math.log(1 + math.exp(-0.5)), math.log(1 + math.exp(1.5))], abs=1e-6)
    assert bradley_terry_loss(chosen, rejected, center_coef=0.1).tolist() == pytest.approx(
        [expected[0] + 0.1 * 9, expected[1] + 0.1 * 1], abs=1e-6)


def test_reward_model_score_is_the_value_at_the_last_real_token_whatever_the_padding_or_batch():
    torch.manual_seed(0)
    rm = RewardModel(GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32)).eval()
    seq = torch.randint(4, 64, (7,))
    with torch.no_grad():
        alone = rm(seq[None], torch.ones(1, 7, dtype=torch.long))
        right = rm(torch.cat([seq, torch.zeros(3, dtype=torch.long)])[None],
                   torch.tensor([[1] * 7 + [0] * 3]))
        left = rm(torch.cat([torch.zeros(3, dtype=torch.long), seq])[None], torch.tensor([[0] * 3 + [1] * 7]))
        other = torch.randint(4, 64, (10,))
        batch = torch.stack([torch.cat([seq, torch.zeros(3, dtype=torch.long)]), other])
        batched = rm(batch, torch.tensor([[1] * 7 + [0] * 3, [1] * 10]))[:1]
        last_value = rm.values(seq[None])[:, -1]
    torch.testing.assert_close(alone, last_value, rtol=0, atol=0)
    for got in (right, left, batched):
        torch.testing.assert_close(got, alone, rtol=0, atol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_every_trainable_weight_of_a_reward_model_and_a_critic_gets_a_gradient(tied):
    """DDP fails at its first step on a trainable weight without a gradient: an untied model's
    lm_head (TinyLlama, Mistral, Llama) was one in the reward model and the critic."""
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16, norm="rmsnorm",
                        pos="rope", mlp="swiglu", bias=False, tie_embeddings=tied))
    ids, mask = torch.randint(0, 64, (2, 6)), torch.ones(2, 6, dtype=torch.long)
    rm = RewardModel.from_gpt(gpt)
    assert ("backbone.lm_head.weight" in rm.state_dict()) == tied  # tied: it is the embedding
    torch.testing.assert_close(rm.backbone.hidden_states(ids, mask), gpt.hidden_states(ids, mask), atol=0,
                               rtol=0)
    rm(ids, mask).sum().backward()
    assert [name for name, p in rm.named_parameters() if p.grad is None] == []
    critic = RewardModel.from_gpt(gpt)
    logits, values = PolicyAndCritic(gpt, critic)(ids, mask)
    (logits.sum() + values.sum()).backward()
    assert [name for name, p in critic.named_parameters() if p.grad is None] == []


def test_scalar_head_gives_one_value_per_position():
    head = ScalarHead(32)
    assert head(torch.randn(3, 5, 32)).shape == (3, 5)
