"""Weighted k-nearest-neighbour classification of frozen features (cosine, k=20, T=0.07).

Each rank extracts features for its share of the labelled shards; features are gathered so every
rank computes the same accuracy. Under ZeRO-3 every rank runs the same number of forward passes
(the eval loader pads), so parameter gathering never deadlocks.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


@torch.no_grad()
def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                num_classes: int, k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Predicted labels ``long [M]`` for ``test_feats [M, D]`` from ``train_feats [N, D]``, ``train_labels [N]``.

    Features are L2-normalised here; each of the k nearest neighbours votes ``exp(cos / T)`` for its class.
    """
    train = F.normalize(train_feats.float(), dim=1)
    test = F.normalize(test_feats.float(), dim=1)
    k = min(k, train.shape[0])
    preds = []
    for start in range(0, test.shape[0], chunk):
        sim = test[start:start + chunk] @ train.T                        # [m, N]
        top_sim, top_idx = sim.topk(k, dim=1)                            # [m, k]
        votes = torch.zeros(sim.shape[0], num_classes)
        votes.scatter_add_(1, train_labels[top_idx], (top_sim / temperature).exp())
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


def knn_top1(train_feats, train_labels, test_feats, test_labels, num_classes: int, k: int = 20,
             temperature: float = 0.07) -> float:
    """Top-1 accuracy in percent."""
    pred = knn_predict(train_feats, train_labels, test_feats, num_classes, k, temperature)
    return 100.0 * (pred == test_labels).float().mean().item()


def _gather(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Concatenate a per-rank CPU tensor (first dim may differ by rank) across ranks, in rank order.

    The collectives run on ``device`` (NCCL needs CUDA tensors; gloo takes CPU ones); the result is on CPU.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    n = torch.tensor([t.shape[0]], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    width = int(max(s.item() for s in sizes))
    padded = torch.zeros((width, *t.shape[1:]), dtype=t.dtype, device=device)
    padded[: t.shape[0]] = t.to(device)
    out = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return torch.cat([o[: int(s.item())].cpu() for o, s in zip(out, sizes)])


@torch.no_grad()
def extract_features(encoder, loader, device: torch.device, pool: str = "cls") -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``encoder`` (eval mode, no masking) over an eval-mode loader; features of all ranks.

    Returns ``feats float [M, D]`` and ``labels long [M]`` with padding entries dropped.
    """
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    for batch in loader:
        img = batch["image"].to(device, non_blocking=True)
        f = encoder.pool(encoder.forward_features(img), pool).float().cpu()
        valid = batch.get("valid")
        keep = valid if valid is not None else torch.ones(f.shape[0], dtype=torch.bool)
        feats.append(f[keep])
        labels.append(batch["label"][keep])
    encoder.train(was_training)
    f = torch.cat(feats) if feats else torch.zeros(0, encoder.embed_dim)
    y = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
    return _gather(f, device), _gather(y, device)


class KNNEvaluator:
    """kNN top-1 of an encoder: memory bank from ``train_loader``, queries from ``test_loader``."""

    def __init__(self, train_loader, test_loader, num_classes: int | None = None, k: int = 20,
                 temperature: float = 0.07, pool: str = "cls"):
        self.train_loader, self.test_loader = train_loader, test_loader
        self.num_classes, self.k, self.temperature, self.pool = num_classes, k, temperature, pool

    def __call__(self, encoder, device: torch.device) -> dict[str, float]:
        """``{"eval/knn_top1": percent, ...}``; classes default to ``max label + 1`` of bank and queries."""
        xtr, ytr = extract_features(encoder, self.train_loader, device, self.pool)
        xte, yte = extract_features(encoder, self.test_loader, device, self.pool)
        classes = self.num_classes or int(max(ytr.max(), yte.max())) + 1
        acc = knn_top1(xtr, ytr, xte, yte, classes, self.k, self.temperature)
        return {"eval/knn_top1": acc, "eval/knn_bank": float(xtr.shape[0]), "eval/knn_queries": float(xte.shape[0])}
