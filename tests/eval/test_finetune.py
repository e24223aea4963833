"""Fine-tuning pieces: the classifier keeps the encoder's weights, loads strictly into timm, soft-target loss,
recipes with MAE's official hparams."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from mimscale.errors import ConfigError
from mimscale.eval.finetune import Classifier, build_classifier, load_recipe
from mimscale.eval.source import load_source
from mimscale.models.vit import build_vit, timm_kwargs


@pytest.fixture
def source(tmp_path):
    torch.manual_seed(0)
    enc = build_vit("vit_micro", 16, 4, 3)
    save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, str(tmp_path / "e.safetensors"))
    return load_source(tmp_path / "e.safetensors")


def test_classifier_holds_the_encoder_and_loads_strictly_into_timm(source):
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    model = build_classifier(source, 10, drop_path=0.1, head_init_std=2e-5)
    assert model.global_pool == "avg" and isinstance(model.norm, torch.nn.Identity)
    sd = model.state_dict()
    for k, v in source.state.items():
        if not k.startswith("norm."):
            assert torch.equal(sd[k], v), k
    assert model.head.weight.std() < 1e-4 and torch.equal(model.fc_norm.weight, torch.ones(64))
    timm_model = TimmViT(**timm_kwargs(model)).eval()
    timm_model.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(timm_model(x), model.eval()(x), atol=1e-5)


def test_soft_target_loss_equals_cross_entropy_on_one_hot(source):
    task = Classifier(build_classifier(source, 10, 0.0, 0.02)).eval()
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([1, 2, 3, 9])
    ref = F.cross_entropy(task.model(x), y)
    assert torch.allclose(task.loss(x, F.one_hot(y, 10).float()), ref, atol=1e-6)
    out = task({"image": x, "target": F.one_hot(y, 10).float()})
    assert torch.allclose(out.loss, ref, atol=1e-6) and set(out.metrics) == {"loss"}


@pytest.mark.parametrize(
    "name,arch,epochs,blr,decay,dp",
    [
        ("finetune_vit_b16", "vit_base", 100, 5e-4, 0.65, 0.1),
        ("finetune_vit_l16", "vit_large", 50, 1e-3, 0.75, 0.2),
        ("finetune_vit_h14", "vit_huge", 50, 1e-3, 0.75, 0.3),
    ],
)
def test_recipes_carry_mae_hparams(source, name, arch, epochs, blr, decay, dp):
    source.arch = arch  # the default recipe follows the arch
    r = load_recipe(None, [], source)
    assert r.model.arch == arch and (r.train.epochs, r.optim.blr, r.finetune.layer_decay, r.model.drop_path) == (
        epochs,
        blr,
        decay,
        dp,
    )
    assert (r.train.batch_size, r.optim.weight_decay, tuple(r.optim.betas), r.optim.warmup_epochs) == (
        1024,
        0.05,
        (0.9, 0.999),
        5,
    )
    f = r.finetune
    assert (f.mixup, f.cutmix, f.smoothing, f.rand_aug, f.reprob) == (0.8, 1.0, 0.1, "rand-m9-mstd0.5-inc1", 0.25)
    assert load_recipe(name, [], source).finetune.layer_decay == decay


def test_recipe_errors(source):
    with pytest.raises(ConfigError, match="finetune.mixupp"):
        load_recipe("finetune_vit_b16", ["finetune.mixupp=0.1"], source)
    with pytest.raises(ConfigError, match="even"):
        load_recipe("finetune_vit_b16", ["train.micro_batch_size=7"], source)
    with pytest.raises(ConfigError, match="no fine-tune recipe"):
        load_recipe("finetune_vit_x", [], source)
