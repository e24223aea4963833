"""Typed run configuration: YAML recipe + ``key=value`` dotlist overrides.

Unknown keys, wrong types and impossible combinations raise :class:`ConfigError` with one line
that names the key (and the closest valid one). Values that follow from others (lr from blr, steps,
warmup, gradient accumulation) are derived once in :func:`derive` and saved into the run directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import yaml

from .errors import ConfigError
from .ranges import check_ranges, num

CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULT_RECIPE = "tiny_cpu"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ModelConfig:
    arch: str = "vit_base"
    img_size: int = num(224, ">= 1")
    patch_size: int = num(16, ">= 1")
    in_chans: int = num(3, ">= 1")
    drop_path: float = num(0.0, "[0, 1)")
    layer_scale_init: float | None = num(None, "> 0")
    pos_embed: Literal["sincos", "learned", "relative"] = "sincos"  # relative: BEiT shared rel-pos bias
    grad_checkpointing: bool = False
    compile: bool = False  # torch.compile every transformer block (encoder and decoder)
    # start from released weights: our export/run/checkpoint, a timm ViT or BEiT state dict, the official MAE
    # pre-training checkpoint (encoder AND decoder), Hugging Face ViT / ViTMAE (docs/guide/weights.md)
    init: str | None = None


@dataclass
class DataConfig:
    train: str = "fashion-mnist:train"  # shard source, or a built-in name converted on first use
    root: str = "~/.cache/mimscale/data"  # where built-in data sets are converted to shards
    samples_per_epoch: int | None = num(None, ">= 1")  # default: the manifest's sample count
    num_workers: int = num(8, ">= 0")
    shuffle_buffer: int = num(5000, ">= 0")
    crop_scale: tuple[float, float] = num((0.2, 1.0), "(0, 1]")
    hflip: bool = True
    mean: tuple[float, ...] = num(IMAGENET_MEAN, "any")
    std: tuple[float, ...] = num(IMAGENET_STD, "> 0")
    decode: Literal["auto", "cpu", "device"] = "auto"  # device: batched nvJPEG decode + crop on the GPU; auto: on
    #                                        CUDA when the objective's transform allows it (else cpu, in the workers)


@dataclass
class OptimConfig:
    blr: float = num(1.5e-4, "> 0")  # base lr; lr = blr * batch_size / 256
    lr: float | None = num(None, "> 0")  # absolute lr; overrides blr
    min_lr: float = num(0.0, ">= 0")
    warmup_epochs: float = num(40.0, ">= 0")
    weight_decay: float = num(0.05, ">= 0")
    weight_decay_end: float | None = num(None, ">= 0")  # cosine wd schedule end value (None: constant)
    betas: tuple[float, float] = num((0.9, 0.95), "[0, 1)")
    eps: float = num(1e-8, "> 0")
    clip_grad: float = num(0.0, ">= 0")  # 0: no clipping
    # auto: torch.optim.AdamW(fused=True) on CUDA, torch's foreach AdamW on CPU (nothing JIT-compiled);
    # fused / torch: those two anywhere; deepspeed: DeepSpeed's FusedAdam (JIT-built, needs nvcc + CUDA toolkit)
    impl: Literal["auto", "torch", "fused", "deepspeed"] = "auto"


@dataclass
class TrainConfig:
    epochs: float = num(800.0, "> 0")
    batch_size: int = num(4096, ">= 1")  # effective (global) batch per optimizer step
    micro_batch_size: int = num(64, ">= 1")  # per device per forward
    steps: int | None = num(None, ">= 1")  # the run's length in optimizer steps (warm-up and cosine end here);
    #                                       replaces `epochs` when set
    stop_after_steps: int | None = num(None, ">= 1")  # hard cut: stop here; the schedule still spans the whole run
    max_steps: int | None = num(None, ">= 1")  # deprecated name of stop_after_steps
    max_minutes: float | None = num(None, "> 0")  # stop early after this much wall-clock
    # the lr / wd / EMA schedules end at max_minutes of training time whatever the throughput: their position is
    # max(step / total, train time / max_minutes) (`mimscale compare`'s minutes budget; epochs is then a cap)
    schedule_by_time: bool = False
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    tf32: bool = True  # CUDA: TF32 tensor cores for fp32 matmuls/convolutions
    zero_stage: int = num(1, "[0, 3]")
    offload: bool = False  # ZeRO-Offload of optimizer state (stage 1-3) and params (stage 3)
    ds_config: str | None = None  # a DeepSpeed knobs file instead of ds_configs/zero{stage}.json
    seed: int = num(0, "[0, 4294967295]")  # numpy takes 32-bit seeds
    run_dir: str = "runs/{objective}_{arch}"
    log_every: int = num(10, ">= 1")
    save_every: int = num(0, ">= 0")  # optimizer steps between checkpoints (0: only by time / at the end)
    save_every_minutes: float | None = num(30.0, "> 0")  # wall-clock minutes between checkpoints
    keep_last: int = num(3, ">= 1")  # complete checkpoints kept (older ones are removed after a save)
    resume: Literal["auto", "never"] = "auto"  # auto: continue from RUN_DIR/checkpoints/latest when present
    nonfinite_patience: int = num(20, ">= 1")  # non-finite steps in a row before on_nonfinite acts
    on_nonfinite: Literal["rollback", "stop"] = "stop"  # rollback: reload the last checkpoint, lr x rollback_lr_scale
    rollback_lr_scale: float = num(0.5, "(0, 1]")
    # progressive resolution: [[fraction of the budget, img_size], ...] from fraction 0, ending at model.img_size,
    # e.g. [[0.0, 16], [0.7, 32]]: 16 px for the first 70 % of the lr schedule, then full (docs/guide/recipes.md)
    resolution_schedule: tuple[tuple[float, int], ...] | None = None


@dataclass
class EvalConfig:
    knn_train: str | None = None  # labelled shard directory (or built-in name): the kNN bank
    knn_test: str | None = None  # labelled shard directory (or built-in name): queries
    knn_train_samples: int | None = num(None, ">= 1")  # cap on the memory bank (whole shards are taken)
    knn_test_samples: int | None = num(None, ">= 1")  # cap on the queries (whole shards are taken)
    knn_every: int = num(0, ">= 0")  # steps between kNN evaluations (0: only at start/end)
    knn_every_minutes: float | None = num(None, "> 0")  # or: minutes of training time (evaluation excluded)
    knn_at_start: bool = True  # the random-init baseline
    knn_k: int = num(20, ">= 1")
    knn_temperature: float = num(0.07, "> 0")
    pool: Literal["cls", "mean"] = "cls"
    img_size: int | None = num(None, ">= 1")  # default: model.img_size
    batch_size: int = num(256, ">= 1")
    num_workers: int = num(2, ">= 0")


@dataclass
class LogConfig:
    wandb: Literal["auto", "online", "offline", "disabled"] = "auto"
    tensorboard: bool = True
    jsonl: bool = True
    project: str = "mimscale"
    run_name: str | None = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    objective: dict[str, Any] = field(default_factory=lambda: {"name": "mae"})
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)


@dataclass
class Derived:
    """Values that follow from the config and the launch; computed once, saved with the run."""

    world_size: int
    grad_accum: int
    lr: float
    samples_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    run_dir: str


# ----------------------------------------------------------------------------- building


def _check_type(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` converted to ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(value, a, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(str, args))}{hint}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_check_type(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key} must have {len(args)} elements, got {len(value)}")
        return tuple(_check_type(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(cast(type, tp), value, key)
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover - programming error


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys and wrong types raise ConfigError."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            candidates = {(f"{prefix}.{n}" if prefix else n): n for n in names}
            if cls is Config:  # a section-less key: look inside the sections too ("run_dir" -> "train.run_dir")
                for f in dataclasses.fields(Config):
                    if dataclasses.is_dataclass(hints[f.name]):
                        candidates.update({f"{f.name}.{n.name}": n.name for n in dataclasses.fields(hints[f.name])})
            exact = [full for full, short in candidates.items() if short == k]
            close = exact or [
                full
                for full in candidates
                if candidates[full] in difflib.get_close_matches(str(k), list(candidates.values()), n=1)
            ]
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{key}'{hint}")
        kwargs[k] = _check_type(v, hints[k], key)
    obj = cls(**kwargs)
    check_ranges(obj, prefix)
    return obj


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain YAML-able dict (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def recipe_path(name_or_path: str | None) -> Path:
    """A recipe name from mimscale/configs (``mae_vit_b16``) or a YAML path."""
    if not name_or_path:
        name_or_path = DEFAULT_RECIPE
    p = Path(name_or_path).expanduser()
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    builtin = CONFIG_DIR / f"{p.stem}.yaml"
    if builtin.exists() and p.parent == Path("."):
        return builtin
    if p.suffix in (".yaml", ".yml"):
        raise ConfigError(f"config file not found: {p}")
    names = sorted(q.stem for q in CONFIG_DIR.glob("*.yaml"))
    close = difflib.get_close_matches(p.stem, names, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ConfigError(f"no recipe named '{name_or_path}'{hint}; recipes: {', '.join(names)}")


def parse_override(item: str) -> tuple[list[str], Any]:
    """``optim.blr=1e-4`` -> (['optim', 'blr'], 1e-4); the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key=value (e.g. train.epochs=1)")
    key, raw = item.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{item}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and _looks_float(raw):  # YAML 1.1 reads 1e-4 as a string
        value = float(raw)
    return key.split("."), value


def _looks_float(s: str) -> bool:
    """A number YAML 1.1 missed (``1e-4``); not words like ``nan``/``inf`` meant as strings."""
    if not any(ch.isdigit() for ch in s):
        return False
    try:
        float(s)
        return True
    except ValueError:
        return False


def load_raw(recipe: str | None, overrides: Sequence[str] = ()) -> dict:
    path = recipe_path(recipe)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    for item in overrides:
        keys, value = parse_override(item)
        node = raw
        for k in keys[:-1]:
            if node.get(k) is None:  # absent, or an empty section (`log:` with nothing under it)
                node[k] = {}
            node = node[k]
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{k}' is not a section")
        node[keys[-1]] = value
    return raw


def load(recipe: str | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read a recipe, apply overrides, validate every key, including the objective's own knobs; the recipe's
    evaluation sets and normalisation follow a ``data.train`` that is not the recipe's (:func:`follow_data`)."""
    cfg = from_dict(Config, load_raw(recipe, overrides))
    explicit = {".".join(parse_override(o)[0]) for o in overrides}
    own = (load_raw(recipe).get("data") or {}).get("train", DataConfig.train)
    notes = follow_data(cfg, own, explicit) if "data.train" in explicit else []
    validate(cfg)
    if cfg.train.max_steps is not None:
        notes.append(
            "train.max_steps is deprecated: it is train.stop_after_steps (a hard cut; train.steps=N sets the schedule)"
        )
    if notes:
        import logging

        from .dist import detect

        if detect().is_main:
            for line in notes:
                logging.getLogger("mimscale.config").warning("%s", line)
    return cfg


def data_family(source: str, depth: int = 0) -> str:
    """Which data set ``source`` is: a built-in name (``fashion-mnist``), the writer's ``source`` of a shard
    directory's manifest (``folder:/abs/photos``; ``add-targets`` shards are their source's), else itself."""
    from .data.builtin import BUILTIN, is_builtin

    if is_builtin(source):
        return source.split(":", 1)[0]
    path = Path(source).expanduser()
    if depth < 4 and path.is_dir() and (path / "manifest.json").is_file():
        try:
            import json

            written = str(json.loads((path / "manifest.json").read_text()).get("source", ""))
        except (OSError, ValueError):
            return source
        kind, _, rest = written.partition(":")
        if kind == "add-targets":
            return data_family(rest, depth + 1)
        return kind if kind in BUILTIN else written or source
    return source


def follow_data(cfg: Config, recipe_train: str, explicit: set[str]) -> list[str]:
    """Make the recipe's data-set-bound defaults follow ``data.train`` when it is not the recipe's own data set
    (``recipe_train``): kNN on the user's labelled held-out split (or the built-in's test split), else off; mean/std
    from the shards' manifest. Keys set on the command line (``explicit``) are kept. Returns what changed, one
    line each."""
    d, e = cfg.data, cfg.eval
    notes: list[str] = []
    family = data_family(d.train)
    if recipe_train != "???" and family == data_family(recipe_train):
        return notes
    from .data.builtin import BUILTIN

    manifest: dict[str, Any] = {}
    path = Path(d.train).expanduser()
    if path.is_dir() and not (path / "manifest.json").is_file():
        return notes  # not shards (e.g. a raw image folder): the data path says what to run, in one line
    if path.is_dir() and (path / "manifest.json").is_file():
        from .data.shards import read_manifest

        manifest = read_manifest(path)
    if e.knn_train is not None and not explicit & {"eval.knn_train", "eval.knn_test"}:
        held_out = manifest.get("held_out")
        if family in BUILTIN:
            e.knn_train, e.knn_test = f"{family}:train", f"{family}:test"
            notes.append(f"kNN evaluation on {family}'s own splits ({e.knn_train} -> {e.knn_test})")
        elif held_out and manifest.get("classes"):
            e.knn_train, e.knn_test = str(path), str((path / held_out).resolve())
            notes.append(
                f"kNN evaluation on your data: bank {e.knn_train}, queries its held-out split {e.knn_test} "
                "(eval.knn_train=null turns it off)"
            )
        else:
            e.knn_train = e.knn_test = None
            why = "has no labelled held-out split" if not manifest.get("classes") or not held_out else ""
            notes.append(
                f"kNN evaluation is off: data.train is not the recipe's data set and {why or 'is not labelled'}; "
                "turn it on with eval.knn_train=LABELLED_SHARDS eval.knn_test=LABELLED_SHARDS (e.g. the train/ "
                "and val/ of `mimscale data folder SRC OUT --val-fraction 0.1`)"
            )
    keep = {k for k in ("mean", "std") if f"data.{k}" in explicit}
    if keep != {"mean", "std"} and family not in BUILTIN:
        mean, std = manifest.get("mean"), manifest.get("std")
        c = cfg.model.in_chans
        if isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) == 3 and c in (1, 3):
            if "mean" not in keep:
                d.mean = tuple(float(v) for v in mean) if c == 3 else (sum(mean) / 3,)
            if "std" not in keep:
                d.std = tuple(float(v) for v in std) if c == 3 else (sum(std) / 3,)
            notes.append(f"normalisation from the shards' manifest: data.mean={list(d.mean)} data.std={list(d.std)}")
        elif c == 3 and not keep and (d.mean, d.std) != (IMAGENET_MEAN, IMAGENET_STD):
            d.mean, d.std = IMAGENET_MEAN, IMAGENET_STD
            notes.append(
                "normalisation: ImageNet's mean/std (the shards' manifest has none; set data.mean/data.std, or "
                "rewrite the shards with `mimscale data folder`, which measures them)"
            )
    return notes


def validate(cfg: Config) -> None:
    """Checks that need more than one key; the objective validates its own section."""
    from .objectives import objective_class  # late: objectives import config

    for key, value in _walk(to_dict(cfg)):
        if value == "???":
            raise ConfigError(f"{key} must be set (the recipe leaves it to you), e.g. {key}=/path/to/value")

    obj = dict(cfg.objective)
    name = obj.pop("name", None)
    if not name:
        raise ConfigError("objective.name is required (see `mimscale objectives`)")
    cls = objective_class(name)
    from_dict(cls.Config, obj, "objective")
    m, t, d, e = cfg.model, cfg.train, cfg.data, cfg.eval
    from .models.vit import ARCHS

    if m.arch not in ARCHS:
        close = difflib.get_close_matches(m.arch, list(ARCHS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"model.arch='{m.arch}' is not one of {', '.join(ARCHS)}{hint}")
    if m.img_size % m.patch_size:
        raise ConfigError(f"model.img_size={m.img_size} is not a multiple of model.patch_size={m.patch_size}")
    if t.offload and t.zero_stage == 0:
        raise ConfigError("train.offload=true needs train.zero_stage >= 1")
    if m.compile and t.zero_stage == 3:
        raise ConfigError(
            "model.compile=true with train.zero_stage=3: ZeRO-3 gathers each block's parameters "
            "in module hooks that a compiled block bypasses; use zero_stage 0-2, or compile=false"
        )
    if t.batch_size < t.micro_batch_size:
        raise ConfigError(f"train.batch_size={t.batch_size} must be >= train.micro_batch_size={t.micro_batch_size}")
    if t.schedule_by_time and not t.max_minutes:
        raise ConfigError("train.schedule_by_time=true needs train.max_minutes (the time the schedules end at)")
    if len(d.mean) != m.in_chans or len(d.std) != m.in_chans:
        raise ConfigError(f"data.mean/data.std need {m.in_chans} values (model.in_chans)")
    if d.crop_scale[0] > d.crop_scale[1]:
        raise ConfigError(f"data.crop_scale={list(d.crop_scale)} must satisfy 0 < min <= max <= 1")
    if (e.knn_train is None) != (e.knn_test is None):
        raise ConfigError("eval.knn_train and eval.knn_test must be set together")
    if t.resolution_schedule is not None:
        check_resolution_schedule(cfg, cls)


def check_resolution_schedule(cfg: Config, objective: type) -> None:
    """``train.resolution_schedule``: fractions increasing from 0 within [0, 1), sizes multiples of the patch size
    up to the last, which is model.img_size; an objective and encoder that can follow it."""
    m, sched = cfg.model, cfg.train.resolution_schedule
    key = "train.resolution_schedule"
    if not sched:
        raise ConfigError(f"{key} is empty; give [[0.0, SIZE], ..., [FRACTION, {m.img_size}]] or leave it unset")
    fractions, sizes = [f for f, _ in sched], [s for _, s in sched]
    if fractions[0] != 0.0:
        raise ConfigError(f"{key} must start at fraction 0.0 (the size of the first steps), got {fractions[0]}")
    if any(not 0.0 <= f < 1.0 for f in fractions) or any(b <= a for a, b in zip(fractions, fractions[1:])):
        raise ConfigError(f"{key}: the fractions {fractions} must increase within [0, 1)")
    for s in sizes:
        if s < m.patch_size or s % m.patch_size:
            raise ConfigError(f"{key}: size {s} is not a positive multiple of model.patch_size={m.patch_size}")
        if s > m.img_size:
            raise ConfigError(f"{key}: size {s} is larger than model.img_size={m.img_size}")
    if sizes[-1] != m.img_size:
        raise ConfigError(
            f"{key} must end at model.img_size={m.img_size} (the size it is exported at), got {sizes[-1]}"
        )
    if not getattr(objective, "supports_resolution_schedule", False):
        raise ConfigError(f"{key}: objective '{cfg.objective['name']}' trains only at model.img_size; unset it")
    if m.pos_embed == "relative":
        raise ConfigError(f"{key} needs an absolute position embedding (model.pos_embed=sincos or learned)")


def _walk(node: Any, prefix: str = ""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{prefix}.{k}" if prefix else k)
    else:
        yield prefix, node


def objective_knobs(cfg: Config) -> Any:
    """The objective's typed config dataclass built from ``cfg.objective``."""
    from .objectives import objective_class

    obj = dict(cfg.objective)
    cls = objective_class(obj.pop("name"))
    return from_dict(cls.Config, obj, "objective")


def derive(cfg: Config, world_size: int, samples_per_epoch: int) -> Derived:
    """lr = blr * batch / 256, accumulation from batch / (micro * world), steps, warmup."""
    t, o = cfg.train, cfg.optim
    per_step = t.micro_batch_size * world_size
    if t.batch_size % per_step:
        raise ConfigError(
            f"train.batch_size={t.batch_size} is not divisible by train.micro_batch_size x world size = "
            f"{t.micro_batch_size} x {world_size}; change one of them"
        )
    steps_per_epoch = samples_per_epoch // t.batch_size
    if steps_per_epoch < 1:
        raise ConfigError(
            f"train.batch_size={t.batch_size} is larger than an epoch ({samples_per_epoch} samples); "
            "lower it or raise data.samples_per_epoch"
        )
    total = t.steps if t.steps is not None else math.ceil(t.epochs * steps_per_epoch)
    warmup = round(o.warmup_epochs * steps_per_epoch)
    if t.steps is not None and warmup >= total and o.warmup_epochs > 0:
        raise ConfigError(
            f"optim.warmup_epochs={o.warmup_epochs} is {warmup} steps, not less than train.steps={t.steps} "
            f"({steps_per_epoch} steps per epoch); lower optim.warmup_epochs"
        )
    run_dir = t.run_dir.format(objective=cfg.objective.get("name"), arch=cfg.model.arch)
    return Derived(
        world_size=world_size,
        grad_accum=t.batch_size // per_step,
        lr=o.lr if o.lr is not None else o.blr * t.batch_size / 256,
        samples_per_epoch=samples_per_epoch,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        warmup_steps=min(total, warmup),
        run_dir=run_dir,
    )


def save_resolved(cfg: Config, derived: Derived, path: Path) -> None:
    doc = to_dict(cfg)
    doc["objective"] = {"name": cfg.objective["name"], **to_dict(objective_knobs(cfg))}
    doc["derived"] = to_dict(derived)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    tmp.replace(path)
