"""ceiling.py: the optimal frontier against exact enumeration, the sentiment tilts, best-of-N.

    python -m pytest -q tests/test_ceiling.py
"""
import math

import pytest
import torch

from ceiling import SentimentTilt, best_of_n, completion_logprobs, mixture_log_ratio, optimal_frontier
from evaluate import sample_completions
from tokenizer import Tokenizer
from toy import POLARITY


def test_importance_weighted_frontier_matches_the_exact_optimal_policy():
    """A discrete reference over 6 responses: pi*(y) = p(y) exp(r(y)/beta) / Z enumerated
    exactly, against the estimate from 200000 reference samples."""
    p = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.07, 0.03], dtype=torch.float64)
    r = torch.tensor([0.1, 0.3, 0.5, 0.6, 0.8, 0.95], dtype=torch.float64)
    draws = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    betas = [1.0, 0.3, 0.1, 0.05]
    estimates = optimal_frontier(r[draws][None], betas)
    for beta, (b, gold, kl, reached) in zip(betas, estimates, strict=True):
        pi = p * torch.exp(r / beta)
        pi /= pi.sum()
        exact_gold, exact_kl = (pi * r).sum().item(), (pi * (pi / p).log()).sum().item()
        assert b == beta and reached
        assert gold == pytest.approx(exact_gold, abs=0.005)
        assert kl == pytest.approx(exact_kl, rel=0.03, abs=0.002)


def test_frontier_at_large_beta_is_the_reference_and_kl_is_capped_by_log_k():
    rewards = torch.rand(3, 50, generator=torch.Generator().manual_seed(0))
    (_, gold, kl, reached), (_, _, kl_sharp, reached_sharp) = optimal_frontier(rewards, [1e6, 1e-6])
    assert (gold == pytest.approx(rewards.double().mean().item(), abs=1e-6)
            and kl == pytest.approx(0, abs=1e-9))
    assert kl_sharp == pytest.approx(math.log(50), abs=1e-6)  # all weight on one of 50 samples
    assert reached and not reached_sharp  # effective sample size 50, then 1


def test_a_proposal_near_the_optimum_extends_the_frontier_where_reference_samples_fall_short():
    """60 responses whose reward rises as the reference makes them rarer, so pi* at small beta
    puts its mass where the reference rarely samples. Half the samples from a tilted proposal
    g ~ p exp(r / 0.02), weighted by p / (p/2 + g/2), recover the exact gold reward and KL up to
    KL 8.6; the reference's samples alone fall short there, and those points are marked."""
    n, M, K = 60, 8, 2000
    p = torch.exp(-0.12 * torch.arange(n, dtype=torch.float64))
    p /= p.sum()
    r = torch.arange(n, dtype=torch.float64) / (n - 1)
    g = p * torch.exp(r / 0.02)
    g /= g.sum()
    generator = torch.Generator().manual_seed(0)
    draw = lambda dist, k: torch.multinomial(dist, M * k, replacement=True, generator=generator).view(M, k)
    from_reference, mixed = draw(p, K), torch.cat([draw(p, K // 2), draw(g, K // 2)], dim=1)
    log_ratio = mixture_log_ratio(p.log(), torch.stack([p.log(), g.log()]))  # log p / (p/2 + g/2), (n,)
    assert torch.allclose(log_ratio, p.log() - (torch.logaddexp(p.log(), g.log()) - math.log(2)))
    betas = [1.0, 0.3, 0.1, 0.05, 0.02, 0.01]
    reference_only = optimal_frontier(r[from_reference], betas)
    with_proposal = optimal_frontier(r[mixed], betas, log_ratio=log_ratio[mixed])
    for beta, ref_point, mix_point in zip(betas, reference_only, with_proposal, strict=True):
        pi = p * torch.exp(r / beta)
        pi /= pi.sum()
        exact_gold, exact_kl = (pi * r).sum().item(), (pi * (pi / p).log()).sum().item()
        _, gold, kl, reached = mix_point
        assert (reached and gold == pytest.approx(exact_gold, abs=0.006)
                and kl == pytest.approx(exact_kl, rel=0.02))
        _, gold, kl, reached = ref_point
        if beta <= 0.05:
            assert not reached and kl < exact_kl - 0.5  # beyond the reference samples' reach, and marked
    assert with_proposal[-1][2] > 8.5


def test_a_ladder_of_proposals_covers_the_kls_between_the_reference_and_one_far_proposal():
    """The same 60 responses with 120 samples a prompt, as the study draws. Split between the
    reference and one proposal tilted for KL 8.6, the weights at beta = 0.1 (KL 3.5) fall on a
    few samples: the estimate is low and marked. Split in equal numbers between the reference
    and proposals tilted for KL 3.5, 7.2 and 8.6, weighted against their mixture, every point
    matches exact enumeration and is reached."""
    n, M, K = 60, 64, 120
    p = torch.exp(-0.12 * torch.arange(n, dtype=torch.float64))
    p /= p.sum()
    r = torch.arange(n, dtype=torch.float64) / (n - 1)
    tilted = lambda beta: (p * torch.exp(r / beta)) / (p * torch.exp(r / beta)).sum()
    generator = torch.Generator().manual_seed(0)
    betas = [1.0, 0.3, 0.1, 0.05, 0.03, 0.02, 0.01]

    def frontier(policies):
        per_policy = K // len(policies)
        draws = torch.cat([torch.multinomial(q, M * per_policy, replacement=True,
                                             generator=generator).view(M, per_policy)
                           for q in policies], dim=1)  # (M, K), as the rewards in ceiling_study
        log_ratio = mixture_log_ratio(p.log(), torch.stack([q.log() for q in policies]))
        return optimal_frontier(r[draws], betas, log_ratio=log_ratio[draws])

    far, ladder = frontier([p, tilted(0.01)]), frontier([p, tilted(0.1), tilted(0.03), tilted(0.01)])
    for beta, (_, gold, kl, reached) in zip(betas, ladder, strict=True):
        pi = tilted(beta)
        exact_gold, exact_kl = (pi * r).sum().item(), (pi * (pi / p).log()).sum().item()
        assert (reached and gold == pytest.approx(exact_gold, abs=0.008)
                and kl == pytest.approx(exact_kl, rel=0.02, abs=0.03))
    _, gold, _, reached = far[2]
    assert not reached and gold < (tilted(0.1) * r).sum().item() - 0.01


def test_completion_logprobs_match_a_float64_loop_over_each_sequence_alone(model, pair_batch):
    """The ceiling's importance weights need log pi(y|x) of whole completions, batched with padding."""
    _, tok = pair_batch
    prompts = [[2] + tok.encode("the movie"), [2] + tok.encode("i loved the film . the plot")]
    completions = [tok.encode("was great .") + [3], tok.encode("was not bad . i") + [3]]
    got = completion_logprobs(model, prompts, completions, tok.pad_id)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        with torch.no_grad():
            logp = model(torch.tensor([p + c]))[0].double().log_softmax(-1)
        assert got[i].item() == pytest.approx(sum(logp[len(p) - 1 + t, c[t]].item() for t in range(len(c))),
                                              rel=1e-5)


def word_signs(tok: Tokenizer, prompt: str, completion_ids: list[int]) -> list[dict[int, int]]:
    """By hand, as data.gold_reward reads words: before each completion token, the sign each
    one-token sentiment word would add to the net count (flipped inside a sentence after "not")."""
    negated = False
    for word in prompt.split():
        negated = (negated or word == "not") and word != "."
    signs = []
    for token in completion_ids:
        signs.append({tok.encode(w)[0]: -s if negated else s for w, s in POLARITY.items()
                      if len(tok.encode(w)) == 1})
        word = tok.decode([token]).strip()
        negated = (negated or word == "not") and word != "."
    return signs


def test_tilted_logprobs_are_the_reference_logits_shifted_by_the_gold_rewards_word_signs(tiny_gpt, toy_dir):
    """log q_b(y) = sum_t log softmax(logits_t + b * sign_t - b / 2 at eos)[y_t], against a float64
    loop with the signs read word by word as the gold reward reads them; strength 0 is the reference."""
    tok = Tokenizer.load(f"{toy_dir}/tokenizer.model")
    prompts = ["the movie", "the plot was not", "i loved it . the story was"]
    completions = [tok.encode("was great . the cast was not dull .") + [tok.eos_id],
                   tok.encode("great . the acting was awful .") + [tok.eos_id],
                   tok.encode("not bad . not great")]
    prompt_ids = [tok.encode_prompt(p) for p in prompts]
    tilts = [SentimentTilt(tok, 0.0), SentimentTilt(tok, 1.5)]
    got = completion_logprobs(tiny_gpt, prompt_ids, completions, tok.pad_id, tilts=tilts)
    assert got.shape == (2, 3)
    torch.testing.assert_close(got[0], completion_logprobs(tiny_gpt, prompt_ids, completions, tok.pad_id))
    for i, (prompt, p, c) in enumerate(zip(prompts, prompt_ids, completions)):
        with torch.no_grad():
            logits = tiny_gpt(torch.tensor([p + c]))[0].double()
        expected = 0.0
        for t, (token, signs) in enumerate(zip(c, word_signs(tok, prompt, c))):
            shifted = logits[len(p) - 1 + t].clone()
            for word_id, sign in signs.items():
                shifted[word_id] += 1.5 * sign
            shifted[tok.eos_id] -= 0.75
            expected += shifted.log_softmax(-1)[token].item()
        assert got[1, i].item() == pytest.approx(expected, rel=1e-5)


def test_generation_with_a_tilt_samples_the_tilted_distribution(tiny_gpt, toy_dir):
    """The sampler and the density the weights use must be one distribution: the share of first
    tokens that are positive words, sampled through generate's logits_processor, matches the
    tilted probability completion_logprobs gives them, after a plain prompt and a negated one
    (where the tilt favours negative words instead)."""
    tok = Tokenizer.load(f"{toy_dir}/tokenizer.model")
    tilt = SentimentTilt(tok, 2.0)
    positive = [tok.encode(w)[0] for w, s in POLARITY.items() if s > 0]
    for prompt in ["the film was", "the film was not"]:
        ids, _, _ = sample_completions(tiny_gpt, tok, [prompt] * 4000, 1, seed=0, batch_size=1000,
                                       logits_processor=tilt)
        share = sum(c[0] in positive for c in ids) / len(ids)
        logp = completion_logprobs(tiny_gpt, [tok.encode_prompt(prompt)] * len(positive),
                                   [[w] for w in positive], tok.pad_id, tilts=[tilt])[0]
        expected = logp.exp().sum().item()
        untilted = completion_logprobs(tiny_gpt, [tok.encode_prompt(prompt)] * len(positive),
                                       [[w] for w in positive], tok.pad_id).exp().sum().item()
        assert abs(share - expected) < 4 * math.sqrt(expected * (1 - expected) / len(ids))
        assert expected > 2 * untilted if prompt.endswith("was") else expected < untilted / 2


def test_best_of_n_keeps_the_sample_the_reward_model_ranks_first():
    gold = torch.tensor([[0.1, 0.9, 0.5, 0.7]])
    scores = torch.tensor([[0.0, -1.0, 2.0, 3.0]])  # the reward model disagrees with gold on sample 1
    rows = best_of_n(gold, scores, [1, 2, 4])
    assert [g for _, g, _ in rows] == pytest.approx([0.1, 0.1, 0.7])
    assert [kl for *_, kl in rows] == pytest.approx([0.0, math.log(2) - 0.5, math.log(4) - 0.75])
