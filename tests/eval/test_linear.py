"""Linear probe: LARS maths, the head, and a real probe on Fashion-MNIST features in one process."""

from __future__ import annotations

import torch

from mimscale.eval.linear import LARS, LinearConfig, LinearHead, linear_probe
from mimscale.models.vit import build_vit


def test_lars_step():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ||w|| = 5
    b = torch.nn.Parameter(torch.tensor([1.0]))
    opt = LARS([w, b], lr=0.5, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001)
    w.grad, b.grad = torch.tensor([[0.0, 2.0]]), torch.tensor([2.0])
    opt.step()
    # weight: d = g * 0.001 * 5 / 2 -> [0, 0.005]; w -= 0.5 d. bias: plain momentum SGD.
    assert torch.allclose(w, torch.tensor([[3.0, 4.0 - 0.0025]]))
    assert torch.allclose(b, torch.tensor([0.0]))
    opt.step()  # momentum: mu = 0.9 mu + d
    assert torch.allclose(b, torch.tensor([-1.9]))


def test_head_is_parameter_free_bn_plus_linear():
    h = LinearHead(8, 3)
    assert [n for n, _ in h.named_parameters()] == ["fc.weight", "fc.bias"]
    assert h(torch.randn(5, 8)).shape == (5, 3)


def test_probe_on_real_features_single_process(fmnist_small):
    from accelerate import Accelerator

    torch.manual_seed(0)
    enc = build_vit("vit_micro", 16, 4, 3)
    cfg = LinearConfig(
        pool="mean",
        epochs=5,
        batch_size=256,
        blr=0.1,
        warmup_epochs=1,
        optimizer="sgd",
        num_workers=0,
        feature_batch_size=512,
    )
    res = linear_probe(
        enc,
        str(fmnist_small["train"]),
        str(fmnist_small["test"]),
        cfg,
        Accelerator(cpu=True),
        img_size=16,
        in_chans=3,
        mean=(0.286,) * 3,
        std=(0.353,) * 3,
    )
    assert res["train_samples"] == 2048 and res["test_samples"] == 512 and res["classes"] == 10
    assert res["steps"] == 5 * 8 and len(res["curve"]) == 5
    assert res["top1"] > 40.0, res  # chance is 10%
    assert all(not p.requires_grad for p in enc.parameters())


def test_augmented_path_runs_the_frozen_encoder_every_step(fmnist_small):
    from accelerate import Accelerator

    torch.manual_seed(0)
    enc = build_vit("vit_micro", 16, 4, 3)
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    seen = []  # every image batch the encoder embeds
    enc.patch_embed.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    cfg = LinearConfig(
        augment=True,
        epochs=2,
        batch_size=64,
        blr=0.1,
        warmup_epochs=0,
        optimizer="lars",
        train_samples=256,
        test_samples=256,
        num_workers=0,
    )
    res = linear_probe(
        enc,
        str(fmnist_small["train"]),
        str(fmnist_small["test"]),
        cfg,
        Accelerator(cpu=True),
        img_size=16,
        in_chans=3,
        mean=(0.286,) * 3,
        std=(0.353,) * 3,
    )
    assert res["train_samples"] == 256 and res["test_samples"] == 256 and res["steps"] == 2 * 4
    assert len(res["curve"]) == 2 and 0.0 <= res["top1"] <= 100.0
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())  # the encoder stayed frozen
    # the encoder ran once on the 256 test images, then on each step's 64 training images (no cached features) ...
    assert [len(x) for x in seen[1:]] == [64] * 8 and sum(len(x) for x in seen) == 256 + 8 * 64, [len(x) for x in seen]
    # ... and each epoch re-augments: the 2 x 256 training views are all different (RRC + flip; unaugmented
    # epochs would repeat each image once)
    train_views = torch.cat(seen[1:])
    assert len({v.numpy().tobytes() for v in train_views}) == 2 * 256
