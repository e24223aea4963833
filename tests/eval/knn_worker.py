"""Run under ``torchrun --nproc_per_node W``: the sharded kNN on synthetic features and on real shards.

Usage: ``torchrun ... knn_worker.py OUT_DIR TRAIN_SHARDS TEST_SHARDS``. Each rank writes ``OUT_DIR/rank{r}.json``:

* ``synthetic``: rank r holds a contiguous, uneven slice of a seeded bank (301 rows) and the queries
  ``r::W`` of 97; its predictions (with their global query indices) from :func:`knn_predict_sharded`
  with a small chunk (many steps, ranks with different query counts);
* ``lopsided``: the whole bank on rank 0, no bank rows elsewhere (ranks with an empty shard);
* ``real``: :class:`KNNEvaluator` over real Fashion-MNIST shards with a seeded random ``vit_micro``
  (the eval loaders split the shards by rank), plus the bank rows this rank held.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def synthetic(seed: int = 0):
    """``bank [301, 16]``, ``labels [301]`` (5 overlapping clusters), ``queries [97, 16]``."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(5, 16, generator=g) * 2
    labels = torch.randint(5, (301,), generator=g)
    bank = centres[labels] + 1.5 * torch.randn(301, 16, generator=g)
    queries = centres[torch.randint(5, (97,), generator=g)] + 1.5 * torch.randn(97, 16, generator=g)
    return bank, labels, queries


def main(out_dir: str, train: str, test: str) -> None:
    import torch.distributed as tdist

    from mimscale import dist
    from mimscale.data.loader import ShardLoader
    from mimscale.data.transforms import EvalTransform
    from mimscale.eval.knn import KNNEvaluator, knn_predict_sharded
    from mimscale.models.vit import build_vit

    d = dist.detect()
    dist.export(d)
    torch.set_num_threads(1)
    tdist.init_process_group("gloo")
    r, w = d.rank, d.world_size
    bank, labels, queries = synthetic()
    cuts = [0, *sorted(torch.randperm(299, generator=torch.Generator().manual_seed(w))[: w - 1].add(1).tolist()), 301]
    lo, hi = cuts[r], cuts[r + 1]
    mine = torch.arange(r, 97, w)
    pred = knn_predict_sharded(bank[lo:hi], labels[lo:hi], queries[mine], 5, k=7, chunk=8)
    lop = knn_predict_sharded(
        bank if r == 0 else bank[:0], labels if r == 0 else labels[:0], queries[mine], 5, k=7, chunk=16
    )

    torch.manual_seed(0)
    enc = build_vit("vit_micro", 16, 4, 1)
    tf = EvalTransform(16, mean=(0.3,), std=(0.35,), in_chans=1)
    loaders = [
        ShardLoader(src, batch_size=100, transform=tf, rank=r, world_size=w, num_workers=0, mode="eval", shuffle=False)
        for src in (train, test)
    ]
    ev = KNNEvaluator(*loaders, num_classes=10, chunk=200)
    res = ev(enc, torch.device("cpu"))
    Path(out_dir, f"rank{r}.json").write_text(
        json.dumps(
            {
                "world": w,
                "bank_slice": [lo, hi],
                "queries": mine.tolist(),
                "pred": pred.tolist(),
                "lopsided": lop.tolist(),
                "real": res,
                "real_bank_rows": ev.last_bank_rows,
            }
        )
    )
    tdist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
