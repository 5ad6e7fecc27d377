"""evaluate.py: the shared evaluation's KL, zero for the reference and equal to a float64 loop.

    python -m pytest -q tests/test_evaluate.py
"""
import pytest
import torch

from evaluate import sequence_kl
from model import GPT


def test_shared_kl_is_zero_for_the_reference_and_matches_a_float64_loop(model, pair_batch):
    _, tok = pair_batch
    prompts = [[2] + tok.encode("the movie"), [2] + tok.encode("i loved the")]
    completions = [tok.encode("was great .") + [3], tok.encode("plot .") + [3]]
    assert torch.equal(sequence_kl(model, model, prompts, completions, tok.pad_id), torch.zeros(2))
    torch.manual_seed(1)
    other = GPT(model.config).eval()
    for temperature in (1.0, 0.7):  # the KL of the distributions sampled at that temperature
        got = sequence_kl(model, other, prompts, completions, tok.pad_id, temperature=temperature)
        for i, (p, c) in enumerate(zip(prompts, completions)):
            seq = torch.tensor([p + c])
            with torch.no_grad():
                logp = (model(seq)[0].double() / temperature).log_softmax(-1)
                logq = (other(seq)[0].double() / temperature).log_softmax(-1)
            expected = sum((logp[t].exp() * (logp[t] - logq[t])).sum().item()
                           for t in range(len(p) - 1, len(p) + len(c) - 1))
            assert got[i].item() == pytest.approx(expected, rel=1e-4)


def test_the_kl_holds_at_most_max_logits_a_forward_and_equals_one_batch(model, pair_batch, monkeypatch):
    """With room for two sequences' logits, the five sequences go two at a time (3 forwards of
    each model, none wider), and each KL equals the one from a single batch."""
    _, tok = pair_batch
    prompts = [[2] + tok.encode(p) for p in ("the movie", "i loved the", "i", "the plot", "i saw")]
    completions = [tok.encode(c) + [3] for c in ("was great .", "plot .", "saw the cast .", "was dull .", "it .")]
    torch.manual_seed(1)
    other = GPT(model.config).eval()
    whole = sequence_kl(model, other, prompts, completions, tok.pad_id)
    longest = max(len(p) + len(c) for p, c in zip(prompts, completions))
    rows = []
    monkeypatch.setattr(model, "forward", lambda ids, mask, f=model.forward: rows.append(len(ids)) or f(ids, mask))
    chunked = sequence_kl(model, other, prompts, completions, tok.pad_id,
                          max_logits=2 * longest * model.config.vocab_size + 1)
    assert rows == [2, 2, 1]
    assert torch.allclose(chunked, whole, rtol=1e-5, atol=1e-7) and (whole > 0).all()
