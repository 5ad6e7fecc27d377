"""
Rotary positions (Su et al. 2021, RoFormer): the angles of each position, Llama 3's rescaled
frequencies, and the rotation of queries and keys, whole or in part (Phi's partial rotary). The
model (model.py) rotates with them; nothing else of the project is imported.
"""
import math

import torch


def llama3_frequencies(inv_freq: torch.Tensor, factor: float, low_freq_factor: float, high_freq_factor: float,
                       original_context: int) -> torch.Tensor:
    """Llama 3's rotary frequencies (Meta's reference code; transformers' "llama3" rope type): a
    wavelength longer than original_context / low_freq_factor is slowed by `factor`, one shorter
    than original_context / high_freq_factor kept, and those between interpolated linearly in
    original_context / wavelength. It changes every position's angles, not only long ones'."""
    wavelength = 2 * math.pi / inv_freq
    smooth = (original_context / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    between = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return torch.where(wavelength > original_context / low_freq_factor, inv_freq / factor,
                       torch.where(wavelength < original_context / high_freq_factor, inv_freq, between))


def rope_cos_sin(pos: torch.Tensor, head_dim: int, theta: float, dtype,
                 scaling: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding (Su et al. 2021, RoFormer eq. 34) angles pos * theta^(-2i/d) for positions
    (B, T), as cos and sin of shape (B, 1, T, head_dim), in float32 then cast to `dtype`; with
    `scaling`, Llama 3's frequencies (llama3_frequencies)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=pos.device).float() / head_dim)
    if scaling:
        inv_freq = llama3_frequencies(inv_freq, *scaling)
    angles = pos[..., None].float() * inv_freq  # (B, T, hs/2)
    # Hugging Face's half layout: frequency i rotates dims i and i + hs/2 (not 2i and 2i+1, as in
    # the paper), so checkpoints converted for transformers load with no permutation of q and k
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # (B, 1, T, hs)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, nh, T, hs) queries or keys by their positions' angles; where the angles cover
    fewer than hs dims (a partial rotary), the first ones only, the rest passed through."""
    if cos.size(-1) < x.size(-1):
        return torch.cat([apply_rope(x[..., :cos.size(-1)], cos, sin), x[..., cos.size(-1):]], dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin
