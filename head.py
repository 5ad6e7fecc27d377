"""
The output head's log-probs of the labels, straight from the final hidden states: only labelled
positions meet the head, a chunk of rows at a time, so the full (B, T, vocab_size) logits never
exist. `label_logps` is what GPT.forward returns given labels, the log-prob of every loss and
estimate; token_logps, from full logits, is the definition it is tested against.
"""
import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt, padding), as in torch's cross_entropy

HEAD_CHUNK = 2**24  # the most logits label_logps holds at once (64 MB in float32): rows x vocabulary
# the most softmax probabilities HeadLogps keeps from the forward for the backward (256 MB in float32), whole
# chunks in order; past it, chunks are computed again in the backward (one more head matmul each). It holds a
# batch of 4 x 256 labelled tokens at a 50k vocabulary (200 MB), so a common small step does no more matmuls
# than the full logits would, while a larger batch or vocabulary adds at most this much to the step's peak
HEAD_KEEP = 2**26


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul of x runs in: autocast's where it is on, else x's own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _chunk_logits(hidden, weight, dtype, temperature: float) -> torch.Tensor:
    """(n, V) float32 logits of hidden rows (n, C) under the head (V, C), matmul in `dtype`."""
    with torch.autocast(hidden.device.type, enabled=False):
        logits = F.linear(hidden.to(dtype), weight.to(dtype)).float()
    return logits / temperature if temperature != 1.0 else logits


class HeadLogps(torch.autograd.Function):
    """log p(target) of each row of hidden (N, C) under the head `weight` (V, C), (N,) float32,
    n rows (HEAD_CHUNK logits) at a time, so the (N, V) logits never exist whole. The forward
    keeps each row's logsumexp and the softmax of its first chunks, up to `keep` probabilities;
    the backward computes the other chunks' logits again, and takes d log p / d logits =
    onehot - softmax (times the incoming gradient) straight from the softmax. Only the gradients
    that are needed are computed: a frozen head (LoRA) costs one matmul a chunk, not two."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature: float, n: int, keep: int):
        dtype, logps, lses, probs = _compute_dtype(hidden), [], [], []
        for i in range(0, max(1, len(hidden)), n):
            logits = _chunk_logits(hidden[i:i + n], weight, dtype, temperature)
            lse = logits.logsumexp(1)
            logps.append(logits.gather(1, targets[i:i + n, None]).squeeze(1) - lse)
            lses.append(lse)
            if (len(probs) + 1) * n * weight.size(0) <= keep:
                probs.append(logits.sub_(lse[:, None]).exp_())  # (n, V) softmax, in place
        ctx.save_for_backward(hidden, weight, targets, torch.cat(lses), *probs)
        ctx.dtype, ctx.temperature, ctx.n = dtype, temperature, n
        return torch.cat(logps)

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, targets, lse, *probs = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, device=weight.device) if need_weight else None
        for j, i in enumerate(range(0, len(hidden), ctx.n)):
            h, g = hidden[i:i + ctx.n], grad[i:i + ctx.n] / ctx.temperature  # d logits / d (h W^T) = 1 / T
            if j < len(probs):  # overwritten in place: a fresh (n, V) tensor a chunk cost 5-10% of the
                d_logits = probs[j]  # head's time; a second backward (retain_graph=True) is refused by torch
            else:
                d_logits = _chunk_logits(h, weight, ctx.dtype, ctx.temperature)
                d_logits = d_logits.sub_(lse[i:i + ctx.n, None]).exp_()
            d_logits.mul_(-g[:, None])
            # -softmax x g + onehot x g
            d_logits[torch.arange(len(h), device=h.device), targets[i:i + ctx.n]] += g
            d_logits = d_logits.to(ctx.dtype)
            if need_hidden:
                grad_hidden[i:i + ctx.n] = d_logits @ weight.to(ctx.dtype)
            if need_weight:
                grad_weight += d_logits.T @ h.to(ctx.dtype)  # summed over chunks in float32
        grad_weight = None if grad_weight is None else grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def _head_logps(hidden, weight, targets, temperature: float):
    """Each row's log-prob of its target and its distribution's entropy, from the (n, V) logits."""
    logq = _chunk_logits(hidden, weight, _compute_dtype(hidden), temperature).log_softmax(1)
    return logq.gather(1, targets[:, None]).squeeze(1), -(logq.exp() * logq).sum(1)


def label_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                entropy: bool = False):
    """token_logps computed from the final hidden states (B, T, C) and the head's weight, without
    the full (B, T, V) logits: only labelled positions meet the head (prompt and pad rows are
    skipped), HEAD_CHUNK logits at a time (HeadLogps), at most HEAD_KEEP of them kept for the
    backward. Returns (B, T - 1) float32, 0 where the label is IGNORE_INDEX; with entropy=True
    (without a gradient) also the entropy (B, T - 1) of each labelled position's distribution,
    0 elsewhere."""
    B, T, C = hidden.shape
    targets = labels[:, 1:]
    labelled = targets != IGNORE_INDEX  # (B, T-1)
    rows, y = hidden[:, :-1][labelled], targets[labelled]  # (N, C), (N,)
    n = max(1, HEAD_CHUNK // weight.size(0))
    zeros = torch.zeros(B, T - 1, device=hidden.device)
    if not entropy:
        keep = HEAD_KEEP if torch.is_grad_enabled() and (rows.requires_grad or weight.requires_grad) else 0
        return zeros.masked_scatter(labelled, HeadLogps.apply(rows, weight, y, temperature, n, keep))
    if torch.is_grad_enabled():
        raise ValueError("label_logps: entropy is for passes without a gradient")
    parts = [_head_logps(rows[i:i + n], weight, y[i:i + n], temperature)
             for i in range(0, max(1, len(rows)), n)]
    return tuple(zeros.masked_scatter(labelled, torch.cat(p)) for p in zip(*parts))


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The log-probability of each labelled next token, from full logits: logits (B, T, V) at t
    score labels (B, T) at t + 1, so both are shifted by one. Returns (B, T - 1) in float32, 0
    where the label is IGNORE_INDEX (prompt and pad tokens). The definition the model's own
    labelled log-probs (label_logps, which every loss uses) are tested against; the ceiling's
    tilted logits take it directly."""
    B, T, V = logits.shape
    return -F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                            ignore_index=IGNORE_INDEX, reduction="none").view(B, T - 1)
