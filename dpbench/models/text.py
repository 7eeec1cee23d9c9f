"""Text models for IMDb (int64 token ids [B, L], 0 = padding).

Per-sample gradients of an embedding table are B x vocabulary x dim floats (4 GB for 1024 x 10k x
100), so both models declare a small default physical batch size (``physical_batch_size`` meta, used
when ``--physical-batch-size`` is not given; it changes no result): 64 for ``bilstm`` (dim 100,
0.26 GB), 256 for ``embbag`` (dim 16, 0.16 GB).

Both average over the non-padding positions. ``embbag`` is an ``nn.Embedding`` followed by that
masked mean rather than an ``nn.EmbeddingBag``: Opacus' per-sample gradient rule for
``EmbeddingBag`` adds a token's gradient once per review however often the token occurs (it
indexes with ``+=``, which drops repeated indices), so its per-sample gradients would be wrong for
almost every review; the ``nn.Embedding`` rule accumulates repeats correctly.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from opacus.layers import DPLSTM

from dpbench.data.imdb import PAD, VOCAB_SIZE
from dpbench.errors import BadInput
from dpbench.models import MODELS



def _check_tokens(name: str, input_shape: tuple[int, ...]) -> None:
    if len(input_shape) != 1:
        raise BadInput(f"model {name!r} needs token-id sequences [B, L], got inputs of shape {tuple(input_shape)}")


def _masked_mean(x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean of x [B, L, D] over the positions where ``tokens`` is not padding."""
    mask = (tokens != PAD).unsqueeze(-1).to(x.dtype)
    return (x * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class BiLSTM(nn.Module):
    """DPSUR Appendix B IMDb model: Embedding 100 -> FC 32 -> bidirectional LSTM 32 -> FC 16 -> FC classes.

    tanh between the layers and a mean over time of the LSTM outputs, as DPSUR's code; the LSTM is
    Opacus' ``DPLSTM`` (same function as ``nn.LSTM``, built from linear layers so per-sample
    gradients exist); the mean skips padding.
    """

    def __init__(self, vocab_size: int = VOCAB_SIZE, num_classes: int = 2, embedding_dim: int = 100,
                 hidden: int = 32) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        self.fc0 = nn.Linear(embedding_dim, hidden)
        self.lstm = DPLSTM(hidden, hidden, batch_first=True, bidirectional=True)
        self.fc1 = nn.Linear(2 * hidden, 16)
        self.fc2 = nn.Linear(16, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.fc0(self.embedding(tokens)))
        x, _ = self.lstm(x)
        return self.fc2(torch.tanh(self.fc1(_masked_mean(x, tokens))))


class EmbeddingMean(nn.Module):
    """Mean of word embeddings -> linear: a fast bag-of-words baseline."""

    def __init__(self, vocab_size: int = VOCAB_SIZE, num_classes: int = 2, embedding_dim: int = 16) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        self.fc = nn.Linear(embedding_dim, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc(_masked_mean(self.embedding(tokens), tokens))


@MODELS.register("bilstm", datasets=("imdb",), physical_batch_size=64,
                 summary="DPSUR IMDb model: Embedding 100, FC 32, BiLSTM 32 (Opacus DPLSTM), FC 16, FC 2")
def bilstm(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    _check_tokens("bilstm", input_shape)
    return BiLSTM(num_classes=num_classes)


@MODELS.register("embbag", datasets=("imdb",), physical_batch_size=256,
                 summary="fast text baseline: mean of 16-dim word embeddings -> linear")
def embbag(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    _check_tokens("embbag", input_shape)
    return EmbeddingMean(num_classes=num_classes)
