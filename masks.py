"""
Boolean attention masks, True where a query may attend a key: a padded batch's, with any cached
keys (attention_mask_4d), and a sliding window laid over any mask (sliding_window), the window
counted in positions, so that it is the same for a padded, a cached or a packed batch (packing.py
builds the packed batch's own mask). The model (model.py) uses them; nothing else of the project
is imported.
"""
import torch


def attention_mask_4d(attention_mask: torch.Tensor | None, past: int, T: int, device) -> torch.Tensor | None:
    """Boolean (B, 1, T, past + T) mask, True where query t may attend key s: s is not after t and
    s is a real token. A pad query also attends itself, so no softmax row is empty (NaN); its
    output is garbage that no loss or sample ever reads. None when plain causal attention does."""
    if attention_mask is None and past == 0:
        return None  # lets SDPA take its is_causal fast path
    S = past + T
    query_pos = torch.arange(past, S, device=device)[:, None]
    key_pos = torch.arange(S, device=device)[None, :]
    allowed = key_pos <= query_pos  # (T, S)
    if attention_mask is None:
        return allowed[None, None]
    allowed = (allowed[None] & attention_mask[:, None, :].bool()) | (key_pos == query_pos)  # (B, T, S)
    return allowed[:, None]


def sliding_window(mask: torch.Tensor | None, query_pos: torch.Tensor, key_pos: torch.Tensor,
                   window: int) -> torch.Tensor:
    """`mask` (B, 1, T, S; None: causal) narrowed to the keys fewer than `window` positions
    before each query (Mistral, Gemma 3): query_pos (B, T) and key_pos (B, S) number each row's
    real tokens, so left padding, a KV cache and packing all give the same window. A token at
    the window's edge sees window - 1 earlier ones, as transformers' sliding_window does."""
    near = (query_pos[:, None, :, None] - key_pos[:, None, None, :]) < window  # (B, 1, T, S)
    if mask is None:
        T, S = query_pos.size(-1), key_pos.size(-1)
        mask = torch.ones(T, S, dtype=torch.bool, device=near.device).tril(S - T)[None, None]
    return mask & near
