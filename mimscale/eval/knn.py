"""Weighted k-nearest-neighbour classification of frozen features (cosine, k=20, T=0.07), sharded over ranks.

Each rank extracts features for its share of the labelled shards and KEEPS them on its device: the memory
bank is sharded (rank r holds only its ~N/world rows, never the whole bank). Classification
(:func:`knn_predict_sharded`) runs in chunks of queries: every rank contributes a chunk of its own queries, the
chunk is all-gathered (each rank sees the same ``[world * c, D]`` queries), each rank scores them against its
bank shard and keeps its top-k ``(similarity, label)`` candidates, the candidates are all-gathered and every
rank merges them (the global top-k of the ``world * k`` candidates is the top-k of the whole bank), then the
usual weighted vote. Peak memory per rank: bank/world + one ``[c_global, N/world]`` similarity block.

Under ZeRO-3 every rank runs the same number of forward passes (the eval loader pads), so parameter
gathering never deadlocks, and the encoder is called as a module (its hooks gather even the root's own
parameters); padding rows are dropped (``valid``), so every sample is counted exactly once.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _vote(top_sim: torch.Tensor, top_lab: torch.Tensor, num_classes: int, temperature: float) -> torch.Tensor:
    """Weighted vote: ``top_sim, top_lab [m, k]`` (``-inf`` similarity = no neighbour) -> labels ``long [m]``."""
    votes = torch.zeros(top_sim.shape[0], num_classes, device=top_sim.device)
    votes.scatter_add_(1, top_lab, (top_sim / temperature).exp())
    return votes.argmax(dim=1)


@torch.no_grad()
def knn_predict(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Predicted labels ``long [M]`` for ``test_feats [M, D]`` from ``train_feats [N, D]``, ``train_labels [N]``.

    One process, the whole bank (the reference the sharded path must reproduce). Features are L2-normalised
    here; each of the k nearest neighbours votes ``exp(cos / T)`` for its class.
    """
    train = F.normalize(train_feats.float(), dim=1)
    test = F.normalize(test_feats.float(), dim=1).to(train.device)
    labels = train_labels.to(train.device)
    k = min(k, train.shape[0])
    preds = []
    for start in range(0, test.shape[0], chunk):
        sim = test[start : start + chunk] @ train.T  # [m, N]
        top_sim, top_idx = sim.topk(k, dim=1)  # [m, k]
        preds.append(_vote(top_sim, labels[top_idx], num_classes, temperature))
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long, device=train.device)


def knn_top1(
    train_feats, train_labels, test_feats, test_labels, num_classes: int, k: int = 20, temperature: float = 0.07
) -> float:
    """Top-1 accuracy in percent (one process, whole bank)."""
    pred = knn_predict(train_feats, train_labels, test_feats, num_classes, k, temperature)
    return 100.0 * (pred.cpu() == test_labels.cpu()).float().mean().item()


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather(t: torch.Tensor) -> torch.Tensor:
    """``t [n, ...]`` (the same shape on every rank) -> ``[world, n, ...]`` in rank order."""
    _, world = _world()
    if world == 1:
        return t.unsqueeze(0)
    out = torch.empty((world, *t.shape), dtype=t.dtype, device=t.device)
    dist.all_gather(list(out.unbind(0)), t.contiguous())
    return out


def _sum(values: list[int | float], device: torch.device) -> list[float]:
    """Sum small per-rank numbers over all ranks."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if _world()[1] > 1:
        dist.all_reduce(t)
    return t.tolist()


def _max(value: int, device: torch.device) -> int:
    t = torch.tensor([value], dtype=torch.long, device=device)
    if _world()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


@torch.no_grad()
def knn_predict_sharded(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
    normalized: bool = False,
) -> torch.Tensor:
    """Predictions ``long [m]`` for this rank's ``queries [m, D]`` against the bank sharded over all ranks.

    ``bank [n_r, D]`` / ``bank_labels long [n_r]``: this rank's shard (any size, possibly 0). A collective: every
    rank of the default process group calls it (with its own shard and queries). ``chunk``: queries scored per
    step over all ranks together (each rank contributes ``ceil(chunk / world)``). Equal to :func:`knn_predict`
    on the concatenated bank (up to float rounding of the similarities). ``normalized=True``: ``bank`` and
    ``queries`` are float32 rows of unit length already (no normalised copy of the shard is made).
    """
    rank, world = _world()
    dev = bank.device
    if not normalized:
        bank = F.normalize(bank.float(), dim=1)
        queries = F.normalize(queries.float(), dim=1)
    queries = queries.to(dev)
    labels = bank_labels.to(dev)
    (n_total,) = _sum([bank.shape[0]], dev)
    if n_total == 0:
        raise ValueError("the kNN memory bank is empty on every rank")
    k_eff = min(k, int(n_total))
    k_local = min(k_eff, bank.shape[0])
    per_rank = max(1, -(-chunk // world))
    steps = -(-_max(queries.shape[0], dev) // per_rank)
    dim = queries.shape[1] if queries.dim() == 2 else bank.shape[1]
    preds = []
    for s in range(steps):
        q = queries[s * per_rank : (s + 1) * per_rank]  # [m_s, D], m_s <= per_rank
        padded = torch.zeros(per_rank, dim, device=dev)
        padded[: q.shape[0]] = q
        allq = _all_gather(padded).view(world * per_rank, dim)  # [W c, D]  every rank's chunk
        cand_sim = torch.full((world * per_rank, k_eff), float("-inf"), device=dev)
        cand_lab = torch.zeros((world * per_rank, k_eff), dtype=torch.long, device=dev)
        if k_local:
            top_sim, top_idx = (allq @ bank.T).topk(k_local, dim=1)  # [W c, k_local] over this shard
            cand_sim[:, :k_local], cand_lab[:, :k_local] = top_sim, labels[top_idx]
        sims = _all_gather(cand_sim).permute(1, 0, 2).reshape(world * per_rank, world * k_eff)  # [W c, W k]
        labs = _all_gather(cand_lab).permute(1, 0, 2).reshape(world * per_rank, world * k_eff)
        mine = slice(rank * per_rank, rank * per_rank + q.shape[0])  # merge only this rank's own queries
        top_sim, pos = sims[mine].topk(k_eff, dim=1)  # [m_s, k] global top-k
        preds.append(_vote(top_sim, labs[mine].gather(1, pos), num_classes, temperature))
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long, device=dev)


#: ``precision`` of the standalone evaluations (``mimscale eval knn|linear --precision``).
EVAL_PRECISIONS = ("auto", "bf16", "fp16", "fp32")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def eval_autocast(device: torch.device | str, precision: str = "auto", autocast: Callable[..., Any] = torch.autocast):
    """The context a frozen encoder's feature pass runs in: ``torch.autocast(device_type, dtype=...)`` or none.

    ``auto``: bf16 autocast on CUDA (as the in-training evaluation, whose engine holds bf16 weights), plain fp32
    elsewhere (a CPU without bf16 units runs it ~30x slower); ``bf16`` / ``fp16``: that autocast on any device
    type that supports it (:func:`torch.amp.is_autocast_available`; else plain fp32 and a warning); ``fp32``:
    none. ``autocast`` is the factory called (a test passes a recorder).
    """
    if precision not in EVAL_PRECISIONS:
        from ..errors import ConfigError

        raise ConfigError(f"precision={precision!r} must be one of {', '.join(EVAL_PRECISIONS)}")
    kind = torch.device(device).type
    if precision == "auto":
        precision = "bf16" if kind == "cuda" else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext()
    if not torch.amp.is_autocast_available(kind):
        logging.getLogger("mimscale.eval").warning("no autocast on device type %s: evaluating in fp32", kind)
        return contextlib.nullcontext()
    return autocast(kind, dtype=_DTYPES[precision])


def _features(encoder, img: torch.Tensor) -> torch.Tensor:
    """``encoder.forward_features(img)`` called THROUGH ``encoder(...)``: the module's forward hooks run, so under
    ZeRO-3 DeepSpeed gathers the root's own parameters (``cls_token``, ``pos_embed``), which a direct call of the
    method would find empty (partitioned). ``img [B, C, H, W]`` -> ``[B, 1 + N, D]``."""
    encoder.forward = encoder.forward_features  # an instance attribute shadows the class's forward
    try:
        return encoder(img)
    finally:
        del encoder.forward


@torch.no_grad()
def extract_features(
    encoder, loader, device: torch.device, pool: str = "cls", normalize: bool = False, precision: str = "fp32"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``encoder`` (eval mode, no masking) over an eval-mode loader: THIS rank's share, kept on ``device``.

    Returns ``feats float [m, D]`` (L2-normalised per batch with ``normalize=True``) and ``labels long [m]`` of
    this rank's samples with padding entries dropped (the eval loader gives every sample to exactly one rank).
    The padding is dropped once, after the pass (one boolean index, i.e. one host synchronisation, per pass
    instead of one per batch); batches are copied to the device without blocking. ``precision``: the forward's
    autocast (:func:`eval_autocast`; fp32 = none); the features are fp32 either way.
    """
    was_training = encoder.training
    encoder.eval()
    feats, labels, keeps = [], [], []
    for batch in loader:
        img = batch["image"].to(device, non_blocking=True)
        with eval_autocast(device, precision):
            f = encoder.pool(_features(encoder, img), pool).float()
        if normalize:
            f = F.normalize(f, dim=1)
        valid = batch.get("valid")
        keeps.append(valid if valid is not None else torch.ones(f.shape[0], dtype=torch.bool))  # CPU
        feats.append(f)
        labels.append(batch["label"].to(device, non_blocking=True))
    encoder.train(was_training)
    if not feats:
        return torch.zeros(0, encoder.embed_dim, device=device), torch.zeros(0, dtype=torch.long, device=device)
    keep = torch.cat(keeps).to(device, non_blocking=True)
    return torch.cat(feats)[keep], torch.cat(labels)[keep]


class KNNEvaluator:
    """kNN top-1 of an encoder: memory bank from ``train_loader``, queries from ``test_loader``.

    Both loaders are this rank's eval-mode share; the bank stays sharded on the device (see module docstring).
    """

    def __init__(
        self,
        train_loader,
        test_loader,
        num_classes: int | None = None,
        k: int = 20,
        temperature: float = 0.07,
        pool: str = "cls",
        chunk: int = 1024,
        precision: str = "fp32",
    ):
        self.train_loader, self.test_loader = train_loader, test_loader
        self.precision = precision  # autocast of the feature pass (eval_autocast); the Trainer's engine is bf16
        self.num_classes, self.k, self.temperature, self.pool = num_classes, k, temperature, pool
        self.chunk = chunk
        self.last_bank_rows = 0  # bank rows this rank held in the last evaluation (its shard)

    def __call__(self, encoder, device: torch.device) -> dict[str, float]:
        """``{"eval/knn_top1": percent, ...}``; classes default to ``max label + 1`` of bank and queries."""
        xtr, ytr = extract_features(encoder, self.train_loader, device, self.pool, True, self.precision)
        xte, yte = extract_features(encoder, self.test_loader, device, self.pool, True, self.precision)
        self.last_bank_rows = int(xtr.shape[0])
        local_max = int(torch.cat([ytr, yte]).max()) if len(ytr) + len(yte) else -1
        classes = self.num_classes or _max(local_max, device) + 1
        pred = knn_predict_sharded(xtr, ytr, xte, classes, self.k, self.temperature, self.chunk, normalized=True)
        correct, bank, queries = _sum([int((pred == yte).sum()), xtr.shape[0], xte.shape[0]], device)
        acc = 100.0 * correct / queries if queries else float("nan")
        return {"eval/knn_top1": acc, "eval/knn_bank": float(bank), "eval/knn_queries": float(queries)}
