"""DPO: the loss and its variants against hand-computed values, log-prob masking, the
concatenated forward, precomputed reference log-probs and IPO's two-action example.

    python -m pytest -q tests/test_dpo.py
"""
import math

import pytest
import torch

from distributed import Dist
from dpo import concatenated_forward, dpo_loss, dpo_metric_sums, response_lengths, sequence_logps
from head import token_logps
from train_dpo import reference_logps

# Two pairs. Row 0: log-ratios chosen 1.0, rejected -0.5, so h = 1.5. Row 1: chosen 0, rejected 1, h = -1.
POLICY_CHOSEN = torch.tensor([-1.0, -2.0])
POLICY_REJECTED = torch.tensor([-3.0, -1.0])
REFERENCE_CHOSEN = torch.tensor([-2.0, -2.0])
REFERENCE_REJECTED = torch.tensor([-2.5, -2.0])
BETA = 0.5  # so beta * h = 0.75 and -0.5


def softplus(x):  # -log sigmoid(-x) = log(1 + e^x)
    return math.log(1 + math.exp(x))


@pytest.mark.parametrize("loss_type, eps, expected", [
    ("sigmoid", 0.0, [softplus(-0.75), softplus(0.5)]),  # [0.38687, 0.97408]
    ("sigmoid", 0.1, [0.9 * softplus(-0.75) + 0.1 * softplus(0.75),
                      0.9 * softplus(0.5) + 0.1 * softplus(-0.5)]),
    ("robust", 0.1, [(0.9 * softplus(-0.75) - 0.1 * softplus(0.75)) / 0.8,
                     (0.9 * softplus(0.5) - 0.1 * softplus(-0.5)) / 0.8]),
    ("hinge", 0.0, [1 - 0.75, 1 + 0.5]),
    ("ipo", 0.0, [(1.5 - 1.0) ** 2, (-1.0 - 1.0) ** 2]),  # 1 / (2 beta) = 1
])
def test_dpo_loss_matches_hand_computed_values(loss_type, eps, expected):
    ones = (torch.ones(2), torch.ones(2))  # one-token responses: IPO's length normalisation changes nothing
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED, BETA, loss_type, eps,
        lengths=ones)
    torch.testing.assert_close(losses, torch.tensor(expected), rtol=0, atol=1e-6)
    torch.testing.assert_close(chosen_rewards, torch.tensor([0.5, 0.0]))  # beta * log-ratio
    torch.testing.assert_close(rejected_rewards, torch.tensor([-0.25, 0.5]))


def test_ipo_normalises_its_loss_by_length_and_logs_the_summed_rewards_as_trl():
    """Chosen: 10 tokens at a log-ratio of +0.2 each; rejected: 2 at +0.5. IPO's loss compares the
    per-token log-ratios (0.2 < 0.5); its logged rewards, accuracy and log-probs are the sums'
    (2.0 > 1.0), as TRL logs them, so the pair counts as ordered right."""
    policy_chosen, policy_rejected = torch.tensor([-8.0]), torch.tensor([-3.0])
    ref_chosen, ref_rejected = torch.tensor([-10.0]), torch.tensor([-4.0])
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, BETA, "ipo",
        lengths=(torch.tensor([10]), torch.tensor([2])))
    assert losses.item() == pytest.approx((0.2 - 0.5 - 1 / (2 * BETA)) ** 2)
    assert (chosen_rewards.item() == pytest.approx(BETA * 2.0)
            and rejected_rewards.item() == pytest.approx(BETA * 1.0))
    metrics = dpo_metric_sums(chosen_rewards, rejected_rewards, policy_chosen, policy_rejected)
    assert metrics["rewards/accuracies"] == 1 and metrics["logps/chosen"] == -8.0
    with pytest.raises(ValueError, match="lengths"):
        dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, BETA, "ipo")


def test_reference_free_compares_against_a_uniform_reference():
    losses, chosen, rejected = dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED,
                                        BETA, reference_free=True)
    # log-ratios are the policy log-probs themselves: h = -1 - (-3) = 2 and -2 - (-1) = -1
    torch.testing.assert_close(losses, torch.tensor([softplus(-1.0), softplus(0.5)]))
    torch.testing.assert_close(chosen, BETA * POLICY_CHOSEN)


def test_unknown_loss_type_is_refused():
    with pytest.raises(ValueError, match="unknown loss_type"):
        dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED, loss_type="kto")


def test_policy_equal_to_reference_gives_ln2_and_zero_rewards(model, pair_batch):
    batch, _ = pair_batch
    with torch.no_grad():
        chosen, rejected = concatenated_forward(model, batch)
    losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, chosen, rejected, beta=0.1)
    torch.testing.assert_close(losses, torch.full((3,), math.log(2)))
    assert (chosen_rewards == 0).all() and (rejected_rewards == 0).all()
    assert ((chosen_rewards - rejected_rewards) == 0).all()


def test_sequence_logps_sums_only_the_response_tokens(model, pair_batch):
    batch, _ = pair_batch
    ids, mask, labels = (batch["rejected_input_ids"], batch["rejected_attention_mask"],
                         batch["rejected_labels"])
    with torch.no_grad():
        logits = model(ids, mask).double()
        got = sequence_logps(model(ids, mask, labels=labels), labels)  # the model's labelled log-probs
    for i in range(len(ids)):  # a plain loop over the labelled positions, in float64
        expected = 0.0
        for t in range(1, ids.size(1)):
            if labels[i, t] != -100:
                expected += logits[i, t - 1].log_softmax(-1)[ids[i, t]].item()
        assert got[i].item() == pytest.approx(expected, abs=1e-4)
    n = [sum(int(labels[i, t]) != -100 for t in range(1, ids.size(1))) for i in range(len(ids))]
    first = labels.clone()
    first[:, 0] = ids[:, 0]  # a label on the first token, which nothing predicts: never counted
    for labelled in (labels, first):
        both = response_lengths({"chosen_labels": labelled, "rejected_labels": labelled})
        assert both[0].tolist() == both[1].tolist() == n


def test_prompt_and_pad_positions_do_not_count(model, pair_batch):
    batch, _ = pair_batch
    ids, mask, labels = batch["chosen_input_ids"], batch["chosen_attention_mask"], batch["chosen_labels"]
    with torch.no_grad():
        base = sequence_logps(model(ids, mask, labels=labels), labels)
        repadded = ids.masked_fill(mask == 0, 77)  # other tokens in the pad slots
        assert torch.allclose(sequence_logps(model(repadded, mask, labels=labels), labels), base, atol=1e-5)
        relabelled = labels.clone()
        relabelled[:, :2] = -100  # bos and the first prompt token were unlabelled already
        assert torch.equal(sequence_logps(model(ids, mask, labels=relabelled), relabelled), base)


def test_concatenated_forward_equals_separate_forwards(model, pair_batch):
    batch, _ = pair_batch
    with torch.no_grad():
        chosen, rejected = concatenated_forward(model, batch)
        for side, got in (("chosen", chosen), ("rejected", rejected)):
            mask = batch[f"{side}_attention_mask"]
            T = int(mask.sum(1).max())  # each side trimmed to its own length
            labels = batch[f"{side}_labels"][:, :T]
            alone = sequence_logps(
                token_logps(model(batch[f"{side}_input_ids"][:, :T], mask[:, :T]), labels), labels)
            torch.testing.assert_close(got, alone, rtol=0, atol=1e-5)


def test_precomputed_reference_logps_equal_live_ones(model, pair_batch):
    batch, _ = pair_batch
    dist = Dist(False, 0, 0, 1, torch.device("cpu"))
    precomputed = reference_logps(model, batch, dist, torch.no_grad(), batch_size=2)  # two batches
    with torch.no_grad():
        live = torch.stack(concatenated_forward(model, batch), dim=1)
    torch.testing.assert_close(precomputed, live, rtol=0, atol=1e-5)


def _two_action_policy(loss_type, steps, lr):
    """The IPO paper's example (Azar et al. 2023, section 5): two actions, y1 always preferred to
    y2, a uniform reference, a softmax policy over two logits, plain gradient descent."""
    theta = torch.zeros(2, requires_grad=True)
    ref = torch.log(torch.tensor([0.5, 0.5]))
    for _ in range(steps):
        logp = theta.log_softmax(0)
        loss, _, _ = dpo_loss(logp[:1], logp[1:], ref[:1], ref[1:], beta=1.0, loss_type=loss_type,
                              lengths=(torch.ones(1), torch.ones(1)))
        theta.grad = None
        loss.sum().backward()
        with torch.no_grad():
            theta -= lr * theta.grad
    return theta.softmax(0)[0].item()


def test_dpo_drives_the_preferred_action_to_certainty_and_ipo_stops_short():
    assert _two_action_policy("sigmoid", 2000, 1.0) > 0.99  # DPO overfits a deterministic preference
    assert _two_action_policy("ipo", 2000, 0.1) == pytest.approx(1 / (1 + math.exp(-0.5)),
                                                                 abs=0.01)  # 0.622 at tau=1
