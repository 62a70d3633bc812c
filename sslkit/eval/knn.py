"""Weighted k-nearest-neighbour classifier on L2-normalised embeddings.

Wu, Xiong, Yu, Lin, "Unsupervised Feature Learning via Non-Parametric Instance
Discrimination", CVPR 2018 (the kNN monitor used by InstDisc, MoCo, DINO): with
``s_i = cos(q, x_i)`` for the ``k`` training embeddings most similar to a query ``q``,
class ``c`` gets the vote::

    w_c(q) = sum_{i in topk(q)} exp(s_i / T) * [y_i = c]          (T = 0.07)

and the prediction is ``argmax_c w_c``; ``w_c / sum_c' w_c'`` is the class score used for
AUROC. The weights are computed as ``exp((s_i - max_j s_j) / T)``: the same ratios (hence the
same normalised votes), without overflow at small ``T`` (``exp(1 / 0.01)`` is beyond float32).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from sslkit.errors import say

TEMPERATURE = 0.07
#: bytes for one chunk of queries: its ``(m, N)`` similarities to every training embedding and its
#: top-k's weights, indices and one-hot votes; the chunk (at most :data:`MAX_CHUNK`) is cut to fit
CHUNK_BYTES = 256 * 2**20
MAX_CHUNK = 1024


def query_chunk(n_train: int, kmax: int, n_classes: int, budget: int | None = None) -> int:
    """Queries per chunk: as many as keep the chunk's working memory within ``budget`` bytes (default
    :data:`CHUNK_BYTES`; float32 similarities ``4 N``, per neighbour ``24 + 16 K``), 1 to :data:`MAX_CHUNK`."""
    budget = CHUNK_BYTES if budget is None else budget
    per_query = max(1, 4 * n_train + kmax * (24 + 16 * n_classes))  # never 0 (no training sample)
    return int(max(1, min(MAX_CHUNK, budget // per_query)))


def knn_votes(train: np.ndarray, train_y: np.ndarray, test: np.ndarray, n_classes: int,
              ks: Sequence[int], temperature: float = TEMPERATURE, chunk: int | None = None,
              device: str | torch.device = "cpu") -> dict[int, np.ndarray]:
    """:func:`scored_votes` on ``device``; on the CPU, with a note, where a GPU's memory cannot hold the
    training embeddings (the votes are the same)."""
    if torch.device(device).type != "cpu":
        try:
            return scored_votes(train, train_y, test, n_classes, ks, temperature, chunk, device)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            say(f"note: the kNN's {len(train):,} training embeddings do not fit in {device}'s memory: scored on "
                "the CPU")
    return scored_votes(train, train_y, test, n_classes, ks, temperature, chunk, "cpu")


def scored_votes(train: np.ndarray, train_y: np.ndarray, test: np.ndarray, n_classes: int,
                 ks: Sequence[int], temperature: float, chunk: int | None,
                 device: str | torch.device) -> dict[int, np.ndarray]:
    """Class scores for every query and every ``k``.

    ``train: (N, D)``, ``train_y: (N,)`` class indices in ``[0, n_classes)``,
    ``test: (M, D)`` -> ``{k: (M, n_classes)}`` normalised votes (rows sum to 1). ``k``
    larger than ``N`` uses all ``N`` neighbours. Ties between classes go to the lower
    class index (``argmax``). Queries go in chunks (``chunk``, default :func:`query_chunk`: a
    bounded working memory whatever ``N``), on ``device`` (the encoder's: a GPU's matmul and top-k).
    """
    xt = F.normalize(torch.from_numpy(np.asarray(train, dtype=np.float32)).to(device), dim=1)
    yt = torch.from_numpy(np.asarray(train_y, dtype=np.int64)).to(device)
    kmax = min(max(ks), len(xt))
    chunk = chunk or query_chunk(len(xt), kmax, n_classes)
    out: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    for start in range(0, len(test), chunk):
        q = F.normalize(torch.from_numpy(np.asarray(test[start:start + chunk], dtype=np.float32)).to(device), dim=1)
        sims, idx = (q @ xt.T).topk(kmax, dim=1)  # sorted, most similar first
        weights = ((sims - sims[:, :1]) / temperature).exp()  # the row's best neighbour weighs 1: no overflow
        onehot = F.one_hot(yt[idx], n_classes).to(weights.dtype)  # (m, kmax, K)
        for k in ks:
            kk = min(k, kmax)
            votes = (weights[:, :kk, None] * onehot[:, :kk]).sum(1)
            out[k].append(votes / votes.sum(1, keepdim=True))
    return {k: torch.cat(v).cpu().numpy() for k, v in out.items()}
