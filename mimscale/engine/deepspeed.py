"""Build the DeepSpeed engine from the YAML config plus a knobs-only ``ds_configs/*.json`` file.

The knobs file holds ZeRO/communication settings only; batch sizes, optimizer, precision and clipping
come from the YAML and are filled in here, so a knobs file that sets them is a conflict (ConfigError).
This module and ``checkpoint.py`` are the only ones that import deepspeed.
"""

from __future__ import annotations

import copy
import json
import logging
import sys
import types
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from ..config import Config, Derived
from ..errors import ConfigError

if TYPE_CHECKING:
    from ..objectives import Objective

log = logging.getLogger("mimscale.train")
DS_CONFIG_DIR = Path(__file__).resolve().parent.parent / "ds_configs"
OWNED_BY_YAML = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "optimizer",
    "scheduler",
    "bf16",
    "fp16",
    "gradient_clipping",
    "amp",
)


def knobs_file(cfg: Config) -> Path:
    """``train.ds_config`` (a path or a name in ds_configs/) or ``zero{stage}[_offload].json``."""
    t = cfg.train
    name = t.ds_config or (f"zero{t.zero_stage}" + ("_offload" if t.offload else ""))
    p = Path(name).expanduser()
    if p.suffix == ".json" and p.exists():
        return p
    builtin = DS_CONFIG_DIR / f"{p.stem}.json"
    if builtin.exists():
        return builtin
    names = ", ".join(sorted(q.stem for q in DS_CONFIG_DIR.glob("*.json")))
    raise ConfigError(f"train.ds_config: no DeepSpeed knobs file '{name}' (built-in: {names})")


def load_knobs(cfg: Config) -> dict:
    path = knobs_file(cfg)
    try:
        knobs = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    clash = [k for k in OWNED_BY_YAML if k in knobs]
    if clash:
        raise ConfigError(f"{path} sets {', '.join(clash)}: these come from the YAML (train.*, optim.*); remove them")
    stage = knobs.get("zero_optimization", {}).get("stage", 0)
    if stage != cfg.train.zero_stage:
        raise ConfigError(f"{path} has ZeRO stage {stage} but train.zero_stage={cfg.train.zero_stage}; make them agree")
    return knobs


def ds_config(cfg: Config, derived: Derived, accelerator: str) -> dict:
    """The full DeepSpeed config dict. ``accelerator`` is 'cuda' or 'cpu' (decides the Adam kernel)."""
    knobs = copy.deepcopy(load_knobs(cfg))
    t, o = cfg.train, cfg.optim
    if t.precision == "fp16" and accelerator != "cuda":
        raise ConfigError(
            "train.precision=fp16 needs CUDA devices (DeepSpeed's CPU accelerator has no fp16 "
            "training); use bf16 or fp32"
        )
    params = {
        "lr": derived.lr,
        "betas": list(o.betas),
        "eps": o.eps,
        "weight_decay": o.weight_decay,
        **optimizer_params(o.impl, accelerator, offloaded(knobs)),
    }
    knobs.update(
        {
            "train_batch_size": t.batch_size,
            "train_micro_batch_size_per_gpu": t.micro_batch_size,
            "gradient_accumulation_steps": derived.grad_accum,
            "optimizer": {"type": "AdamW", "params": params},
            "gradient_clipping": o.clip_grad,
        }
    )
    # DeepSpeed's throughput timer (on unless told otherwise) calls ``accelerator.synchronize()`` in every
    # ``engine.forward`` and ``engine.step``: the host could never run ahead of the GPU. The Trainer measures
    # throughput itself (telemetry), so both it and the per-phase wall-clock breakdown are off unless a knobs
    # file asks for them (profiling).
    knobs.setdefault("timers", {"throughput": {"enabled": False, "synchronized": False}})
    knobs.setdefault("wall_clock_breakdown", False)
    if t.precision == "bf16":
        knobs["bf16"] = {"enabled": True}
    elif t.precision == "fp16":
        knobs["fp16"] = {
            "enabled": True,
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        }
    return knobs


def offloaded(knobs: dict) -> bool:
    zero = knobs.get("zero_optimization", {})
    return "offload_optimizer" in zero or "offload_param" in zero


def optimizer_params(impl: str, accelerator: str, offload: bool) -> dict:
    """The DeepSpeed optimizer ``params`` that pick the Adam kernel. Nothing here is JIT-compiled unless
    asked for: ``auto`` is ``torch.optim.AdamW(fused=True)`` on CUDA and torch's foreach AdamW on CPU,
    both through DeepSpeed's ``torch_adam`` path. ``deepspeed`` is DeepSpeed's FusedAdam, which builds a
    CUDA extension at first use (needs nvcc + a CUDA toolkit). ZeRO-Offload always uses DeepSpeed's
    CPUAdam (built once with g++; the log says so when it builds)."""
    if offload:
        log.info(
            "train.offload: the optimizer is DeepSpeed's CPUAdam, JIT-built once with g++ into "
            "~/.cache/torch_extensions on first use (about a minute)"
        )
        return {}
    impl = ("fused" if accelerator == "cuda" else "torch") if impl == "auto" else impl
    if impl == "deepspeed":
        return {}
    return {"torch_adam": True, **({"fused": True} if impl == "fused" else {})}


def param_groups(model: nn.Module, no_decay: set[str], weight_decay: float) -> list[dict]:
    """Two AdamW groups: decay on >= 2-D weights, none on biases, norms, tokens and ``no_decay`` names.

    Each group carries ``wd_scale`` (1 or 0) so the weight-decay schedule can rescale it later.
    """
    decay: list[nn.Parameter] = []
    rest: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (rest if p.ndim <= 1 or name in no_decay else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "wd_scale": 1.0},
        {"params": rest, "weight_decay": 0.0, "wd_scale": 0.0},
    ]


def skip_shm_comm_build() -> None:
    """Use plain gloo collectives on CPU instead of DeepSpeed's shared-memory allreduce op.

    That op is JIT-compiled with ninja into ~/.cache/torch_extensions at every process start (~1 min of
    two compilers on a busy box, and concurrent launches rebuild it over each other and can wait forever
    on its file lock). CPU runs are tests and demos: gloo is plenty. CUDA runs never build it."""
    import deepspeed.comm.torch  # noqa: F401  (registers the module patched below)

    comm_torch: Any = sys.modules["deepspeed.comm.torch"]
    comm_torch.build_shm_op = lambda: None


# DeepSpeed versions whose every import of the two Muon modules was read (ZeRO-1/2/3 optimizers, bf16
# optimizer, engine): each only asks isinstance(optimizer, MuonWithAuxAdam) or calls muon_update for
# parameters tagged use_muon, which mimscale never tags. Another version imports the real modules.
MUON_STUB_VERIFIED = ("0.19.8",)
_MUON_MODULES = ("deepspeed.runtime.zero.muon.original_muon", "deepspeed.runtime.zero.muon.muon_optimizer")


class _NoMuon:
    """Stands in for DeepSpeed's ``MuonWithAuxAdam``, which mimscale never builds (see :func:`skip_muon_import`)."""

    def __init__(self, *args, **kwargs) -> None:
        raise RuntimeError("DeepSpeed's Muon optimizer is not available through mimscale (the optimizer is AdamW)")


def _no_muon_update(*args, **kwargs):
    raise RuntimeError("DeepSpeed's Muon update was called, but mimscale never tags a parameter use_muon")


def skip_muon_import() -> bool:
    """Keep DeepSpeed from importing its Muon optimizer in every process; True when the stand-ins are in place.

    DeepSpeed's ZeRO optimizers import ``MuonWithAuxAdam`` and ``muon_update`` at engine start and in every
    ZeRO-1/2 gradient partitioning, only to check ``isinstance(optimizer, MuonWithAuxAdam)`` or to update
    parameters tagged ``use_muon``. Importing them wraps three functions in ``torch.compile``, which loads
    inductor: ~1-2 s of CPU per rank at every start, a quarter of a short launch. mimscale's optimizer is
    always AdamW (:func:`ds_config` sets it; the knobs file may not) and no parameter is tagged, so on a
    DeepSpeed version in :data:`MUON_STUB_VERIFIED` both modules are registered as stand-ins whose class is never
    an instance of anything built here and whose update refuses to run: every Muon branch stays off, as it
    does for AdamW. Other versions, and a process that already imported the real modules, keep them."""
    import deepspeed

    if deepspeed.__version__ not in MUON_STUB_VERIFIED or any(m in sys.modules for m in _MUON_MODULES):
        return all(isinstance(sys.modules.get(m), _Stub) for m in _MUON_MODULES)
    for name in _MUON_MODULES:
        stub = _Stub(name, "mimscale's stand-in: Muon is never used (mimscale.engine.deepspeed.skip_muon_import)")
        stub.MuonWithAuxAdam = _NoMuon
        stub.muon_update = stub.adam_update = _no_muon_update
        sys.modules[name] = stub
    return True


class _Stub(types.ModuleType):
    MuonWithAuxAdam: type
    muon_update: Any
    adam_update: Any


def initialize(
    objective: nn.Module,
    cfg: Config,
    derived: Derived,
    accelerator: str,
    load_universal: bool = False,
    groups: list[dict] | None = None,
):
    """``deepspeed.initialize`` on the objective (encoder + heads). Returns the engine.

    Frozen teachers (``objective.frozen_modules()``) never reach DeepSpeed: they are detached from the
    wrapped module for the call, so ZeRO-3 does not partition them and the optimizer never sees them.
    ``load_universal``: the engine will load a DeepSpeed universal checkpoint (a new world size).
    ``groups``: the optimizer's parameter groups (e.g. layer-wise lr decay, each with ``lr_scale`` and
    ``wd_scale``); default: :func:`param_groups` of the objective. Any ``nn.Module`` works (fine-tuning).
    """
    import deepspeed

    if accelerator == "cpu":
        skip_shm_comm_build()
    skip_muon_import()
    frozen = list(getattr(objective, "frozen_modules", list)())
    for m in frozen:
        m.eval().requires_grad_(False)
    outside = frozen + list(getattr(objective, "private_modules", list)())
    with _detached(objective, outside, permanent=True):
        if groups is None:
            no_decay = cast("Objective", objective).no_weight_decay()
            groups = param_groups(objective, no_decay, cfg.optim.weight_decay)
        config = ds_config(cfg, derived, accelerator)
        if load_universal:
            config["checkpoint"] = {"load_universal": True}
        engine, _, _, _ = deepspeed.initialize(
            model=objective, model_parameters=groups, config=config, dist_init_required=True
        )
    dev = torch.device(engine.device)
    for m in outside:
        m.to(dev)
    return engine


def init_distributed() -> None:
    """Initialise torch.distributed through DeepSpeed (before the engine exists, e.g. to convert a checkpoint)."""
    import deepspeed

    from ..dist import accelerator_name

    if accelerator_name() == "cpu":
        skip_shm_comm_build()
    skip_muon_import()
    deepspeed.init_distributed(dist_init_required=True)


def master_params(engine, module: nn.Module):
    """``(name, full fp32 master value)`` for each trainable parameter of ``module`` (inside the engine).

    Reads DeepSpeed's fp32 master copy (bf16/fp16 training at any ZeRO stage), else the parameter itself.
    Under ZeRO-3 each call gathers collectively: every rank must iterate the same parameters.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        full = safe_get_full_fp32_param(p) if engine.zero_optimization_stage() or p.dtype != torch.float32 else None
        yield name, (p.detach() if full is None else full).float().view(getattr(p, "ds_shape", p.shape))


def master_shards(engine, module: nn.Module):
    """Under ZeRO-3: ``[(name, this rank's fp32 master partition [ceil(numel / world)])]`` for each trainable
    parameter of ``module`` (rank r's elements ``[r*p, (r+1)*p)`` of the flattened, zero-padded parameter; no
    collective). ``None`` at ZeRO 0-2, where :func:`master_params` is the way to read the master weights."""
    if engine.zero_optimization_stage() != 3:
        return None
    from deepspeed.utils import safe_get_local_fp32_param

    return [
        (name, safe_get_local_fp32_param(p).reshape(-1)) for name, p in module.named_parameters() if p.requires_grad
    ]


def master_fragments(engine, module: nn.Module) -> list[tuple[str, int, torch.Tensor]] | None:
    """Where the fp32 masters are partitioned across ranks below ZeRO-3 (ZeRO-1/2, DeepSpeed's bf16 optimizer):
    ``[(name, start, this rank's fp32 piece [n])]`` for each trainable parameter of ``module``: elements
    ``[start, start + n)`` of the flattened parameter (``n`` = 0 where this rank holds none of it). The pieces
    of all ranks tile each parameter. No collective (reading them through :func:`master_params` costs one fp32
    all-reduce PER PARAMETER). ``None`` at ZeRO-3 (:func:`master_shards`) and where the masters are the
    parameters themselves, on every rank (fp32 at ZeRO-0)."""
    if engine.zero_optimization_stage() == 3:
        return None
    out = []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if not hasattr(p, "_hp_mapping"):  # DeepSpeed links every optimised parameter, or none
            return None
        m = p._hp_mapping
        if m is None:
            out.append((name, 0, torch.empty(0, dtype=torch.float32, device=p.device)))
        else:
            out.append((name, int(m.lp_fragment_address.start), m.get_hp_fragment().reshape(-1)))
    return out


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Average ``t`` in place over the data-parallel ranks (no-op on one rank)."""
    import torch.distributed as tdist

    if tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.all_reduce(t)
        t /= tdist.get_world_size()
    return t


class _detached:
    """Remove submodules (by identity) from their parents' module trees for the ``with`` block.

    ``permanent``: afterwards they stay out of the tree but remain plain attributes (``parent.name``):
    ZeRO-3 walks every parameter of the wrapped module after each step and fails on ones it does not
    manage, and ``state_dict()``/``.train()``/dtype casts of the engine must not reach teachers either."""

    def __init__(self, root: nn.Module, modules: list[nn.Module], permanent: bool = False):
        self.root, self.ids, self.permanent = root, {id(m) for m in modules}, permanent
        self.removed: list[tuple[nn.Module, str, nn.Module]] = []

    def __enter__(self):
        for parent in list(self.root.modules()):
            for name, child in list(parent._modules.items()):
                if child is not None and id(child) in self.ids:
                    self.removed.append((parent, name, child))
                    del parent._modules[name]
        return self

    def __exit__(self, *exc):
        for parent, name, child in self.removed:
            if self.permanent:
                object.__setattr__(parent, name, child)
            else:
                parent._modules[name] = child
        return False


def set_hparams(engine, lr: float, weight_decay: float) -> None:
    """Write this step's lr and weight decay into every param group (scaled by ``wd_scale``)."""
    for g in engine.optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
        g["weight_decay"] = weight_decay * g.get("wd_scale", 1.0)


def loss_scale(engine) -> float:
    """The factor DeepSpeed multiplies the loss by before ``backward`` in the coming step: the fp16 loss scaler's
    current scale (a Python float, no device read; DeepSpeed changes it only inside ``engine.step()``), else 1."""
    if not engine.fp16_enabled():
        return 1.0
    opt = engine.optimizer
    for holder in (opt, getattr(opt, "loss_scale_config", None), getattr(opt, "loss_scaler", None)):
        scale = getattr(holder, "cur_scale", None)
        if scale is not None:
            return float(scale)
    return 1.0


def grad_norm(engine) -> float | None:
    """The global gradient 2-norm of the last optimizer step, before clipping; ``None`` where DeepSpeed does not
    compute one (fp32 without ZeRO). A host read: call it only when logging."""
    n = engine.get_global_grad_norm()
    return None if n is None else float(n)


def compute_dtype(cfg: Config) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[cfg.train.precision]


def full_state_dict(engine, module: nn.Module) -> dict[str, torch.Tensor]:
    """Full (un-partitioned) fp32 copy of ``module``'s state on every rank, at any ZeRO stage.

    Under ZeRO-3 the parameters are gathered collectively, so every rank must call this.
    Values are the module's working weights (bf16-rounded when training in bf16).
    """
    import deepspeed

    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=engine.zero_optimization_stage() == 3):
        return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}


def save_encoder(engine, path, is_main: bool) -> None:
    """Write the encoder weights (timm key names) as safetensors: the fp32 master weights for parameters,
    the module's buffers (e.g. the sin-cos table) as they are, in the layout timm loads strictly
    (``VisionTransformer.export_state_dict``: BEiT's for ``pos_embed=relative``). Collective under ZeRO-3."""
    from safetensors.torch import save_file

    encoder = engine.module.encoder
    master = dict(master_params(engine, encoder))
    sd = encoder.export_state_dict({k: master.get(k, v) for k, v in full_state_dict(engine, encoder).items()})
    if is_main:
        from ..models.describe import metadata, timm_call

        meta = metadata(encoder, getattr(engine.module, "name", None), Path(path).parent.name)
        meta["timm_call"] = timm_call(encoder, path)  # the header says what it is and how timm loads it
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp), metadata=meta)
        tmp.replace(path)


def save_decoder(engine, path, is_main: bool, meta: dict[str, str]) -> None:
    """Write ``engine.module.decoder`` (its own state-dict names; fp32 master weights for parameters, saved
    buffers as they are) as safetensors with ``meta`` in the header. Collective under ZeRO-3."""
    from safetensors.torch import save_file

    decoder = engine.module.decoder
    master = dict(master_params(engine, decoder))
    sd = {k: master.get(k, v) for k, v in full_state_dict(engine, decoder).items()}
    if is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp), metadata=meta)
        tmp.replace(path)


def local_param_numel(engine) -> int:
    """Parameter elements this rank holds (its ZeRO-3 partition, or everything below stage 3)."""
    return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in engine.module.parameters())


def total_param_numel(engine) -> int:
    """Parameter elements of the whole trained module (partitioned or not)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
