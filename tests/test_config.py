"""mimscale.config: recipes, dotlist overrides, unknown keys, types, combinations, derived values."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from mimscale import config as C
from mimscale.errors import ConfigError

RECIPES = sorted(C.CONFIG_DIR.glob("*.yaml"))
MAE_RECIPES = {"mae_vit_b16": ("vit_base", 16), "mae_vit_l16": ("vit_large", 16), "mae_vit_h14": ("vit_huge", 14)}


def _required_overrides(path: Path) -> list[str]:
    """``key=...`` for every ``???`` the recipe leaves to the user."""
    raw = yaml.safe_load(path.read_text())
    return [f"{k}=/data/shards/train-{{000000..000009}}.tar" for k, v in C._walk(raw) if v == "???"]


def _load(*overrides: str, recipe: str = "tiny_cpu") -> C.Config:
    return C.load(recipe, list(overrides))


def _raises(match_all: list[str], *overrides: str, recipe: str = "tiny_cpu") -> str:
    with pytest.raises(ConfigError) as ei:
        _load(*overrides, recipe=recipe)
    msg = str(ei.value)
    for part in match_all:
        assert part in msg, f"{part!r} not in {msg!r}"
    assert "\n" not in msg
    return msg


# ----------------------------------------------------------------------------- recipes


def test_recipe_dir_is_not_empty():
    names = {p.stem for p in RECIPES}
    assert {"tiny_cpu", "mae_vit_b16", "mae_vit_l16", "mae_vit_h14"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_loads(path):
    cfg = C.load(path.stem, _required_overrides(path))
    assert isinstance(cfg, C.Config)
    # the objective section validates against the objective's own Config
    knobs = C.objective_knobs(cfg)
    assert knobs is not None
    # the same recipe loads by file path too
    cfg2 = C.load(str(path), _required_overrides(path))
    assert C.to_dict(cfg2) == C.to_dict(cfg)


@pytest.mark.parametrize("name", [n for n in MAE_RECIPES])
def test_recipe_with_placeholder_needs_the_override(name):
    msg = _raises(["data.train", "must be set"], recipe=name)
    assert "data.train=" in msg  # says what to type


def test_default_recipe_is_tiny_cpu():
    assert C.to_dict(C.load(None)) == C.to_dict(C.load("tiny_cpu"))


def test_missing_recipe_names_close_match():
    with pytest.raises(ConfigError, match=r"no recipe named 'mae_vit_b61'.*did you mean 'mae_vit_b16'"):
        C.load("mae_vit_b61")
    with pytest.raises(ConfigError, match="config file not found"):
        C.load("/nonexistent/dir/recipe.yaml")


def test_recipe_from_a_user_file(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("train:\n  epochs: 3\n  batch_size: 128\n  micro_batch_size: 32\nobjective:\n  name: mae\n")
    cfg = C.load(str(p))
    assert cfg.train.epochs == 3.0 and isinstance(cfg.train.epochs, float)
    assert cfg.train.batch_size == 128 and cfg.train.micro_batch_size == 32
    # what the file does not set keeps the dataclass default
    assert cfg.model == C.ModelConfig()


@pytest.mark.parametrize("name", list(MAE_RECIPES))
def test_mae_recipes_carry_the_official_hparams(name):
    """OBJECTIVES.md 1.3 / 1.2 / 0."""
    cfg = C.load(name, ["data.train=/x/train-{0..1}.tar"])
    arch, p = MAE_RECIPES[name]
    assert (cfg.model.arch, cfg.model.patch_size, cfg.model.img_size, cfg.model.in_chans) == (arch, p, 224, 3)
    o, t, d = cfg.optim, cfg.train, cfg.data
    assert o.blr == 1.5e-4 and o.lr is None
    assert t.batch_size == 4096
    assert o.betas == (0.9, 0.95)
    assert o.weight_decay == 0.05
    assert o.warmup_epochs == 40.0 and t.epochs == 800.0
    assert o.min_lr == 0.0 and o.clip_grad == 0.0
    assert d.crop_scale == (0.2, 1.0) and d.hflip is True
    assert d.mean == C.IMAGENET_MEAN and d.std == C.IMAGENET_STD
    knobs = C.objective_knobs(cfg)
    assert cfg.objective["name"] == "mae"
    assert knobs.mask_ratio == 0.75 and knobs.norm_pix_loss is True
    assert (knobs.decoder_dim, knobs.decoder_depth, knobs.decoder_heads) == (512, 8, 16)
    # lr = 1.5e-4 * 4096 / 256 = 2.4e-3 (world 32 ranks x micro batch divides 4096 for every recipe)
    world = 4096 // (t.micro_batch_size * 4)
    der = C.derive(cfg, world_size=world, samples_per_epoch=1_281_167)
    assert der.lr == pytest.approx(2.4e-3, rel=1e-12)
    assert der.grad_accum == 4


@pytest.mark.parametrize(
    "name,shape", [("mae_vit_b16", (768, 12, 12)), ("mae_vit_l16", (1024, 24, 16)), ("mae_vit_h14", (1280, 32, 16))]
)
def test_mae_recipe_arch_shapes(name, shape):
    from mimscale.models.vit import ARCHS

    cfg = C.load(name, ["data.train=/x.tar"])
    a = ARCHS[cfg.model.arch]
    assert (a["embed_dim"], a["depth"], a["num_heads"]) == shape
    assert cfg.model.img_size // cfg.model.patch_size == {16: 14, 14: 16}[cfg.model.patch_size]


# ----------------------------------------------------------------------------- overrides with types


def test_override_types():
    cfg = _load(
        "train.epochs=3",  # int given for a float field -> float
        "train.batch_size=512",
        "optim.blr=1e-4",  # YAML 1.1 would read this as a string
        "optim.lr=2.5E-3",
        "optim.min_lr=0",
        "optim.betas=[0.9,0.95]",
        "data.hflip=false",
        "model.grad_checkpointing=true",
        "train.max_steps=null",
        "data.samples_per_epoch=1000",
        "data.mean=[0.5, 0.5, 0.5]",
        "data.train=/data/x-{0..3}.tar",
        "model.layer_scale_init=0.1",
        "train.precision=fp32",
    )
    assert cfg.train.epochs == 3.0 and type(cfg.train.epochs) is float
    assert cfg.train.batch_size == 512 and type(cfg.train.batch_size) is int
    assert cfg.optim.blr == 1e-4 and type(cfg.optim.blr) is float
    assert cfg.optim.lr == 2.5e-3 and type(cfg.optim.lr) is float
    assert cfg.optim.min_lr == 0.0 and type(cfg.optim.min_lr) is float
    assert cfg.optim.betas == (0.9, 0.95) and type(cfg.optim.betas) is tuple
    assert cfg.data.hflip is False
    assert cfg.model.grad_checkpointing is True
    assert cfg.train.max_steps is None
    assert cfg.data.samples_per_epoch == 1000
    assert cfg.data.mean == (0.5, 0.5, 0.5)
    assert cfg.data.train == "/data/x-{0..3}.tar"
    assert cfg.model.layer_scale_init == 0.1
    assert cfg.train.precision == "fp32"


@pytest.mark.parametrize(
    "raw,value",
    [
        ("1e-4", 1e-4),
        ("1.5e-4", 1.5e-4),
        ("3", 3),
        ("-2e3", -2000.0),
        ("[0.9,0.95]", [0.9, 0.95]),
        ("true", True),
        ("False", False),
        ("null", None),
        ("abc", "abc"),
        ("", ""),
    ],
)
def test_parse_override_values(raw, value):
    keys, v = C.parse_override(f"a.b={raw}")
    assert keys == ["a", "b"]
    assert v == value and type(v) is type(value)


def test_parse_override_malformed():
    with pytest.raises(ConfigError, match="key=value"):
        C.parse_override("train.epochs")
    with pytest.raises(ConfigError, match="empty key"):
        C.parse_override("train..epochs=1")
    with pytest.raises(ConfigError, match="empty key"):
        C.parse_override("=1")


def test_words_that_parse_as_float_stay_strings():
    """``float('nan')`` works, but ``log.run_name=nan`` means the string (regression)."""
    for word in ("nan", "inf", "Infinity", "NaN"):
        assert C.parse_override(f"log.run_name={word}")[1] == word
        assert _load(f"log.run_name={word}").log.run_name == word


def test_override_into_an_empty_section(tmp_path):
    """A recipe section with everything commented out is YAML null; overrides still go in (regression)."""
    p = tmp_path / "r.yaml"
    p.write_text("objective:\n  name: mae\nlog:\n  # wandb: offline\n")
    assert C.load(str(p)).log == C.LogConfig()
    assert C.load(str(p), ["log.wandb=offline"]).log.wandb == "offline"


def test_override_into_a_scalar_is_an_error():
    _raises(["train.epochs.x=1", "'epochs' is not a section"], "train.epochs.x=1")


def test_override_later_wins():
    assert _load("train.epochs=2", "train.epochs=5").train.epochs == 5.0


def test_objective_override_goes_to_the_objective_knobs():
    cfg = _load("objective.mask_ratio=0.6", "objective.decoder_depth=1")
    k = C.objective_knobs(cfg)
    assert k.mask_ratio == 0.6 and k.decoder_depth == 1


# ----------------------------------------------------------------------------- unknown keys


def test_unknown_top_level_key():
    _raises(["unknown config key 'trian'", "did you mean 'train'"], "trian.epochs=1")


def test_unknown_nested_key():
    _raises(["unknown config key 'optim.bl'", "did you mean 'optim.blr'"], "optim.bl=1e-3")
    _raises(
        ["unknown config key 'train.micro_batchsize'", "did you mean 'train.micro_batch_size'"],
        "train.micro_batchsize=8",
    )


def test_unknown_objective_key():
    _raises(
        ["unknown config key 'objective.mask_ratoi'", "did you mean 'objective.mask_ratio'"], "objective.mask_ratoi=0.5"
    )


def test_unknown_key_without_close_match_still_names_it():
    msg = _raises(["unknown config key 'model.zzzzzzzz'"], "model.zzzzzzzz=1")
    assert "did you mean" not in msg


def test_unknown_objective_name():
    _raises(["unknown objective.name 'maee'", "did you mean 'mae'"], "objective.name=maee")


def test_objective_name_required(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("objective:\n  mask_ratio: 0.5\n")
    with pytest.raises(ConfigError, match="objective.name is required"):
        C.load(str(p))


# ----------------------------------------------------------------------------- wrong types


@pytest.mark.parametrize(
    "override,words",
    [
        ("train.batch_size=abc", ["train.batch_size", "integer"]),
        ("train.batch_size=true", ["train.batch_size", "integer"]),  # bool is not an int
        ("train.batch_size=64.0", ["train.batch_size", "integer"]),  # float is not an int
        ("train.batch_size=64.5", ["train.batch_size", "integer"]),
        ("train.max_steps=ten", ["train.max_steps", "integer"]),  # int | None
        ("optim.blr=fast", ["optim.blr", "number"]),
        ("optim.blr=true", ["optim.blr", "number"]),
        ("data.hflip=1", ["data.hflip", "true or false"]),
        ("data.hflip=yes please", ["data.hflip", "true or false"]),
        ("data.train=3", ["data.train", "string"]),
        ("optim.betas=0.9", ["optim.betas", "list"]),
        ("optim.betas=[0.9,0.95,0.99]", ["optim.betas", "2 elements"]),
        ("optim.betas=[0.9,x]", ["optim.betas[1]", "number"]),
        ("data.mean=[a,b,c]", ["data.mean[0]", "number"]),
        ("objective.decoder_dim=64.0", ["objective.decoder_dim", "integer"]),
        ("objective.norm_pix_loss=0", ["objective.norm_pix_loss", "true or false"]),
        ("objective.mask_ratio=high", ["objective.mask_ratio", "number"]),
        ("model=vit_base", ["model", "mapping"]),
    ],
)
def test_wrong_types_raise(override, words):
    _raises(words, override)


@pytest.mark.parametrize(
    "override,words",
    [
        ("train.precision=bf-16", ["train.precision='bf-16'", "bf16, fp16, fp32", "did you mean 'bf16'"]),
        ("log.wandb=ofline", ["log.wandb", "did you mean 'offline'"]),
        ("eval.pool=token", ["eval.pool", "cls, mean"]),
        ("optim.impl=fusd", ["optim.impl", "did you mean 'fused'"]),
        ("objective.loss=l1", ["objective.loss", "mse"]),
    ],
)
def test_literal_choices(override, words):
    _raises(words, override)


@pytest.mark.parametrize(
    "override,attr,value",
    [
        ("train.precision=fp16", ("train", "precision"), "fp16"),
        ("log.wandb=disabled", ("log", "wandb"), "disabled"),
        ("eval.pool=cls", ("eval", "pool"), "cls"),
        ("optim.impl=torch", ("optim", "impl"), "torch"),
    ],
)
def test_literal_valid_choices(override, attr, value):
    cfg = _load(override)
    assert getattr(getattr(cfg, attr[0]), attr[1]) == value


# ----------------------------------------------------------------------------- impossible combinations


@pytest.mark.parametrize(
    "overrides,words",
    [
        (["model.img_size=30", "model.patch_size=4"], ["model.img_size=30", "model.patch_size=4", "multiple"]),
        (["train.offload=true", "train.zero_stage=0"], ["train.offload", "zero_stage"]),
        (["train.zero_stage=4"], ["train.zero_stage=4"]),
        (["eval.knn_test=null"], ["eval.knn_train", "eval.knn_test"]),
        (["eval.knn_train=null"], ["eval.knn_train", "eval.knn_test"]),
        (["model.in_chans=1"], ["data.mean/data.std", "1 values", "model.in_chans"]),
        (["data.std=[0.2,0.2]"], ["data.mean/data.std", "3 values"]),
        (["train.batch_size=64", "train.micro_batch_size=128"], ["train.batch_size=64", "micro_batch_size=128"]),
        (["train.micro_batch_size=0"], ["train.micro_batch_size=0"]),
        (["train.epochs=0"], ["train.epochs=0"]),
        (["data.crop_scale=[0.5,0.2]"], ["data.crop_scale"]),
        (["data.crop_scale=[0,1]"], ["data.crop_scale"]),
        (["model.arch=vit_bse"], ["model.arch='vit_bse'", "did you mean 'vit_base'"]),  # regression: was accepted
    ],
)
def test_impossible_combinations(overrides, words):
    _raises(words, *overrides)


def test_valid_combinations_pass():
    _load("train.offload=true", "train.zero_stage=3")
    _load("eval.knn_train=null", "eval.knn_test=null")
    _load("model.in_chans=1", "data.mean=[0.5]", "data.std=[0.5]")


# ----------------------------------------------------------------------------- derive


def _tiny(*overrides) -> C.Config:
    return _load("train.batch_size=256", "train.micro_batch_size=32", *overrides)


def test_derive_lr_from_blr():
    d = C.derive(_tiny("optim.blr=1e-3"), world_size=2, samples_per_epoch=10_000)
    assert d.lr == pytest.approx(1e-3 * 256 / 256)
    d = C.derive(_tiny("optim.blr=1e-3", "train.batch_size=1024"), world_size=2, samples_per_epoch=10_000)
    assert d.lr == pytest.approx(4e-3)


def test_derive_absolute_lr_overrides_blr():
    d = C.derive(
        _tiny("optim.blr=1e-3", "optim.lr=7e-4", "train.batch_size=1024"), world_size=1, samples_per_epoch=10_000
    )
    assert d.lr == 7e-4


@pytest.mark.parametrize("world,accum", [(1, 8), (2, 4), (4, 2), (8, 1)])
def test_derive_grad_accum(world, accum):
    d = C.derive(_tiny(), world_size=world, samples_per_epoch=10_000)
    assert d.grad_accum == accum
    assert d.grad_accum * 32 * world == 256
    assert d.world_size == world


@pytest.mark.parametrize("world", [3, 5, 16])
def test_derive_indivisible_world_size(world):
    with pytest.raises(ConfigError) as ei:
        C.derive(_tiny(), world_size=world, samples_per_epoch=10_000)
    msg = str(ei.value)
    assert "train.batch_size=256" in msg
    assert f"32 x {world}" in msg and "world size" in msg


def test_derive_batch_larger_than_epoch():
    with pytest.raises(ConfigError, match="larger than an epoch"):
        C.derive(_tiny(), world_size=1, samples_per_epoch=255)


def test_derive_steps_and_warmup():
    cfg = _tiny("train.epochs=2", "optim.warmup_epochs=0.5")
    d = C.derive(cfg, world_size=1, samples_per_epoch=10_000)
    assert d.samples_per_epoch == 10_000
    assert d.steps_per_epoch == 10_000 // 256 == 39  # last partial batch dropped
    assert d.total_steps == 78
    assert d.warmup_steps == round(0.5 * 39) == 20


def test_derive_fractional_epochs():
    d = C.derive(_tiny("train.epochs=0.25", "optim.warmup_epochs=0.1"), world_size=1, samples_per_epoch=10_000)
    assert d.total_steps == math.ceil(0.25 * 39) == 10
    assert d.warmup_steps == round(0.1 * 39) == 4
    d = C.derive(_tiny("train.epochs=1.5", "optim.warmup_epochs=0"), world_size=1, samples_per_epoch=10_000)
    assert d.total_steps == math.ceil(1.5 * 39) == 59
    assert d.warmup_steps == 0


def test_derive_warmup_capped_at_total():
    d = C.derive(_tiny("train.epochs=1", "optim.warmup_epochs=40"), world_size=1, samples_per_epoch=10_000)
    assert d.total_steps == 39 and d.warmup_steps == 39


def test_derive_run_dir_template():
    d = C.derive(
        _tiny("train.run_dir=out/{objective}-{arch}", "model.arch=vit_small"), world_size=1, samples_per_epoch=10_000
    )
    assert d.run_dir == "out/mae-vit_small"


# ----------------------------------------------------------------------------- save_resolved


def test_save_resolved(tmp_path):
    cfg = _tiny("objective.mask_ratio=0.6")
    d = C.derive(cfg, world_size=2, samples_per_epoch=10_000)
    path = tmp_path / "run" / "config.yaml"
    C.save_resolved(cfg, d, path)
    assert path.exists() and not path.with_suffix(".tmp").exists()
    doc = yaml.safe_load(path.read_text())
    assert doc["derived"] == {
        "world_size": 2,
        "grad_accum": 4,
        "lr": pytest.approx(d.lr),
        "samples_per_epoch": 10_000,
        "steps_per_epoch": 39,
        "total_steps": d.total_steps,
        "warmup_steps": d.warmup_steps,
        "run_dir": d.run_dir,
    }
    # the objective's FULL knob set, including knobs the recipe did not mention
    import dataclasses

    from mimscale.objectives.mae import MAE

    knob_names = {f.name for f in dataclasses.fields(MAE.Config)}
    assert set(doc["objective"]) == knob_names | {"name"}
    assert doc["objective"]["name"] == "mae"
    assert doc["objective"]["mask_ratio"] == 0.6
    assert doc["objective"]["norm_pix_eps"] == 1e-6
    assert doc["objective"]["loss"] == "mse"
    # every config section is there, tuples as lists
    for section in ("model", "data", "optim", "train", "eval", "log"):
        assert section in doc
    assert doc["optim"]["betas"] == [0.9, 0.95]
    # and the saved file (minus `derived`) loads back to the same config
    del doc["derived"]
    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump(doc))
    assert C.to_dict(C.load(str(again))) == C.to_dict(cfg) | {"objective": doc["objective"]}


# ----------------------------------------------------------------------------- train.steps, the data's defaults


def test_train_steps_sets_the_schedule():
    """train.steps=N: the schedule (warm-up, cosine) ends at N whatever the epochs; a warm-up that would not fit
    is refused in one line; stop_after_steps is the hard cut (the schedule keeps its length)."""
    d = C.derive(_tiny("train.steps=150", "optim.warmup_epochs=0.5"), world_size=1, samples_per_epoch=10_000)
    assert d.total_steps == 150 and d.warmup_steps == 20  # not 2 epochs x 39
    d = C.derive(_tiny("train.steps=150"), world_size=1, samples_per_epoch=300)  # 300 images: 1 step per epoch
    assert d.total_steps == 150
    with pytest.raises(ConfigError, match=r"optim.warmup_epochs=40.0 is 1560 steps, not less than train.steps=100"):
        C.derive(_tiny("train.steps=100", "optim.warmup_epochs=40"), world_size=1, samples_per_epoch=10_000)
    cfg = _tiny("train.stop_after_steps=5")
    assert cfg.train.stop_after_steps == 5 and C.derive(cfg, 1, 10_000).total_steps == 78  # 2 epochs x 39


def test_max_steps_is_a_deprecated_alias(caplog):
    with caplog.at_level("WARNING", logger="mimscale.config"):
        cfg = _load("train.max_steps=7")
    assert cfg.train.max_steps == 7
    assert [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()] == [
        "train.max_steps is deprecated: it is train.stop_after_steps (a hard cut; train.steps=N sets the schedule)"
    ]


def _folder_shards(root: Path, labelled: bool, val: float) -> Path:
    from PIL import Image

    from mimscale.data.shards import write_folder

    for i in range(40):
        d = root / "img" / (f"c{i % 2}" if labelled else "")
        d.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (200, 10 * (i % 2), 30)).save(d / f"{i}.png")
    out = write_folder(root / "img", root / "shards", val_fraction=val, workers=1, progress=False)
    return out / "train" if val else out


def test_own_data_drops_the_recipes_evaluation_and_normalisation(tmp_path, caplog):
    """data.train that is not the recipe's data set: kNN never silently runs on the recipe's data set (on the
    user's held-out split when the shards have a labelled one, else off with one line saying how to turn it on);
    mean/std come from the shards' manifest; what the user set is kept; the recipe's own data changes nothing."""
    from mimscale.data.shards import read_manifest

    labelled = _folder_shards(tmp_path / "l", labelled=True, val=0.25)
    m = read_manifest(labelled)
    with caplog.at_level("WARNING", logger="mimscale.config"):
        cfg = _load(f"data.train={labelled}")
    assert (cfg.eval.knn_train, cfg.eval.knn_test) == (str(labelled), str((labelled.parent / "val").resolve()))
    assert list(cfg.data.mean) == m["mean"] and list(cfg.data.std) == m["std"] and m["mean"][0] > 0.7
    assert any("kNN evaluation on your data" in r.getMessage() for r in caplog.records)
    unlabelled = _folder_shards(tmp_path / "u", labelled=False, val=0.25)
    caplog.clear()
    with caplog.at_level("WARNING", logger="mimscale.config"):
        cfg = _load(f"data.train={unlabelled}")
    assert cfg.eval.knn_train is None and cfg.eval.knn_test is None
    off = [r.getMessage() for r in caplog.records if "kNN evaluation is off" in r.getMessage()]
    assert len(off) == 1 and "eval.knn_train=LABELLED_SHARDS" in off[0] and "\n" not in off[0]
    assert "fashion" not in yaml.safe_dump(C.to_dict(cfg)).lower()
    # what the user set stays
    cfg = _load(f"data.train={labelled}", "eval.knn_train=null", "eval.knn_test=null", "data.mean=[0.5,0.5,0.5]")
    assert cfg.eval.knn_train is None and cfg.data.mean == (0.5, 0.5, 0.5) and list(cfg.data.std) == m["std"]
    # a grey model takes the channel average
    cfg = _load(f"data.train={labelled}", "model.in_chans=1")
    assert cfg.data.mean == pytest.approx((sum(m["mean"]) / 3,))
    # the recipe's own data set (also as shards written from it): nothing changes
    base = _load()
    for same in ("fashion-mnist:train",):
        cfg = _load(f"data.train={same}")
        assert (cfg.eval.knn_train, cfg.data.mean) == (base.eval.knn_train, base.data.mean)
    # another built-in data set: its own splits
    cfg = _load("data.train=mnist:train")
    assert (cfg.eval.knn_train, cfg.eval.knn_test) == ("mnist:train", "mnist:test")


def test_a_raw_image_folder_as_data_train_is_one_line_naming_the_converter(tmp_path, capsys):
    """`mimscale pretrain data.train=photos/` (images, not shards): one error line that says which command writes
    the shards, before any work (no samples_per_epoch advice, no notes about kNN or normalisation)."""
    from PIL import Image

    from mimscale.cli import main

    (tmp_path / "photos").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "photos" / "a.jpg")
    assert main(["pretrain", f"data.train={tmp_path / 'photos'}", f"train.run_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a folder of images, not shards" in err[0] and "mimscale data folder" in err[0]
    assert "samples_per_epoch" not in err[0] and not (tmp_path / "run").exists()
