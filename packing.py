"""
Padding-free packing of a ragged batch: where each real token of a padded (B, T) batch goes when
the sequences are packed whole into fewer rows of the same width, the positions and the
attention mask that keep each sequence to itself, and the moves between the two layouts. The
model (model.py) packs a batch when it saves a row; nothing else of the project is imported.
"""
import torch


class Packing:
    """Where the real tokens of a padded batch (B, T) go when packed into fewer rows of the same
    width T, each packed row holding whole sequences one after another (first-fit decreasing by
    length). A token keeps its position, the number of real tokens before it in its own row,
    and attends only to its own sequence's earlier tokens, so the hidden states of real tokens
    are the padded batch's, up to rounding, while pads cost no compute. Ragged batches of short
    completions (PPO's rollouts, SFT and DPO batches) are a third to a half padding."""

    def __init__(self, attention_mask: torch.Tensor, row_of: list[int], start_of: list[int],
                 shape: tuple[int, int]):
        real = attention_mask.bool()
        self.batch_shape, self.shape = tuple(real.shape), shape
        self.source = real.nonzero(as_tuple=True)  # (row, column) of every real token in the padded batch
        positions = real.long().cumsum(1) - 1  # (B, T)
        sequence, device = self.source[0], real.device
        self.target = (torch.tensor(row_of, device=device)[sequence],  # and in the packed rows
                       torch.tensor(start_of, device=device)[sequence] + positions[self.source])
        self.positions = self.pack(positions)  # (R, W)
        sequences = torch.arange(1, len(real) + 1, device=device)[:, None].expand_as(positions)
        segments = self.pack(sequences)  # 0: a pad
        causal = torch.ones(shape[1], shape[1], dtype=torch.bool, device=device).tril()
        # a token attends its own sequence; trailing pads (segment 0) attend each other, so no
        # softmax row is empty, and their output is garbage that nothing reads
        self.attn_mask = ((segments[:, :, None] == segments[:, None, :]) & causal)[:, None]  # (R, 1, W, W)

    @classmethod
    def of(cls, attention_mask: torch.Tensor) -> "Packing | None":
        """The packing of a padded batch, or None when it would not save a row."""
        B, T = attention_mask.shape
        lengths = attention_mask.bool().sum(1).tolist()
        # tokens used in each packed row; each sequence's row and start
        fill, row_of, start_of = [], [0] * B, [0] * B
        for b in sorted(range(B), key=lambda b: -lengths[b]):
            r = next((r for r, used in enumerate(fill) if used + lengths[b] <= T), len(fill))
            if r == len(fill):
                fill.append(0)
            row_of[b], start_of[b] = r, fill[r]
            fill[r] += lengths[b]
        if len(fill) == B:
            return None
        return cls(attention_mask, row_of, start_of, (len(fill), max(max(fill), 1)))

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) in the padded layout to (R, W, ...), the real tokens only."""
        out = x.new_zeros(self.shape + x.shape[2:])
        out[self.target] = x[self.source]
        return out

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(R, W, ...) back to (B, T, ...), zero at the pads; differentiable."""
        out = x.new_zeros(self.batch_shape + x.shape[2:])
        out[self.source] = x[self.target]
        return out
