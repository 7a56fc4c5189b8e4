"""Gated-attention multiple-instance learning (Ilse et al., 2018): one image label from its patch embeddings."""

# Ships with checkpoints (flattened next to the modeling code): torch only.

from __future__ import annotations

import torch
from torch import nn


class GatedAttentionMIL(nn.Module):
    """Gated-attention MIL head: patch embeddings of a bag (an image) -> attention-pooled image logits.

    ``h = Dropout(ReLU(W_p x))``; ``a = softmax_N(w^T (tanh(V h) * sigmoid(U h)))`` over the unmasked patches;
    ``z = sum_i a_i h_i``; ``logits = W_c z``. The result does not depend on the order of the patches.

    Args:
        embedding_dim: Width ``D`` of the patch embeddings.
        hidden: Width of the projected embeddings and of the attention network.
        num_labels: Number of classes ``C``.
        dropout: Dropout after the projection (training only).
    """

    def __init__(self, embedding_dim: int, hidden: int, num_labels: int, dropout: float = 0.25):
        super().__init__()
        self.projection = nn.Sequential(nn.Linear(embedding_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attention_v = nn.Linear(hidden, hidden)
        self.attention_u = nn.Linear(hidden, hidden)
        self.attention_w = nn.Linear(hidden, 1)
        self.classifier = nn.Linear(hidden, num_labels)
        # Set by training (hf_histo.training.mil); saved with the weights, so a loaded head knows it was trained.
        self.register_buffer("trained", torch.zeros((), dtype=torch.bool))

    @property
    def embedding_dim(self) -> int:
        """Width ``D`` of the patch embeddings the head consumes."""
        return self.projection[0].in_features

    def forward(self, embeddings: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Image logits and patch attention of a batch of bags.

        Args:
            embeddings: Patch embeddings ``[B, N, D]`` (or one bag ``[N, D]``, as a batch of one), bags padded to ``N`` patches.
            mask: ``[B, N]`` bool, True on real patches (default: all real). Every bag needs one real patch.

        Returns:
            ``(logits [B, C], attention [B, N])``: the attention sums to 1 over each bag's patches, 0 on padding.
        """
        if embeddings.dim() == 2:
            return self.forward(embeddings[None], None if mask is None else mask[None])
        if mask is None:
            mask = torch.ones(embeddings.shape[:2], dtype=torch.bool, device=embeddings.device)
        h = self.projection(embeddings)
        scores = self.attention_w(torch.tanh(self.attention_v(h)) * torch.sigmoid(self.attention_u(h))).squeeze(-1)
        scores = scores.float().masked_fill(~mask, float("-inf"))
        attention = torch.softmax(scores, dim=-1).masked_fill(~mask, 0.0)
        pooled = torch.einsum("bn,bnd->bd", attention.to(h.dtype), h)
        return self.classifier(pooled), attention
