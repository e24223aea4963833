"""``mimscale bench plan``: project per-GPU memory, throughput and epoch time before booking a cluster.

Everything is derived from shapes; no GPU is needed. The model and objective are built on the meta
device (no memory, no compute), then:

* **compute** — ``objective.flops_per_sample()`` (analytic training FLOPs per image, 3x forward of
  trained modules, docs/objectives/README.md). Images/s per GPU = ``MFU x peak / FLOPs per image``,
  with the dense bf16/fp16 peak of :data:`mimscale.telemetry.mfu.PEAK_TFLOPS` and an assumed MFU.
* **model states** — ZeRO mixed-precision Adam (Rajbhandari et al. 2020): per trainable parameter
  2 B 16-bit weights + 2 B 16-bit gradients + 12 B fp32 master weights, momentum and variance.
  With N = nodes x GPUs per node and Ψ trainable parameters, per GPU:
  stage 0: 16Ψ; stage 1: 4Ψ + 12Ψ/N; stage 2: 2Ψ + 14Ψ/N; stage 3: 16Ψ/N.
  ``--offload`` (stages 1-3) moves the optimizer part, 12Ψ/N, to CPU RAM.
  Frozen teacher weights (``objective.frozen_modules()``) add 2 B each, replicated on every GPU.
* **ZeRO buffers** — fixed-size communication buffers read from ``mimscale/ds_configs`` (16-bit
  elements, 2 B): stage 0 all-reduces gradients in flattened chunks of up to
  ``min(Ψ, allreduce_bucket_size = 5e8)``; stages 1-2 allocate ``reduce_bucket_size`` gradient
  buckets up front (two of them with ``overlap_comm``); stage 3 holds up to
  ``min(Ψ, stage3_max_live_parameters)`` gathered parameters plus the reduce bucket(s).
* **activations** — per transformer block call on ``L`` tokens of width ``D``, a 16-bit training
  step keeps ``ACT_ELEMS x L x D`` elements per image (2 B each) for the backward, with
  ``ACT_ELEMS = 16``: the block input, LN1 output, q/k/v (3), attention output, the mid-block residual,
  LN2 output, fc1 output (4, GELU's input) and GELU output (4, fc2's input). SDPA's fused
  kernels keep only q/k/v/output and a per-row logsumexp, so no ``L x L`` term. (That is Korthikanti
  et al. 2022's 34 B per token and channel without its two 1-byte dropout masks and the ``L x L``
  scores; ``tests/bench/test_plan.py`` checks the 16 against the tensors autograd really saves for a
  block: 16.2.) Block shapes come from one forward pass
  of the objective on the meta device with hooks on every ``Block``, so every objective (masked
  encoder, full-token decoder, K parts, teachers under ``no_grad``) is covered; frozen blocks
  keep nothing. With activation checkpointing (``--grad-ckpt``, encoder blocks) a checkpointed
  block keeps only its input (1 x L x D) and one block at a time is re-materialised in the
  backward (+16 x L x D of the largest). Tensors saved outside blocks (patch embedding input,
  decoder head, loss) are taken from the same meta pass (autograd's saved tensors, fp32 bytes: an
  upper bound). Everything scales with the micro-batch.
* **runtime overhead** — CUDA context, cuBLAS/NCCL workspaces and allocator fragmentation:
  a flat 2 GB unless ``--overhead-gb`` says otherwise.

GB here is 2**30 bytes (what ``torch.cuda`` and ``nvidia-smi`` report); the GPU capacities in
:data:`GPUS` are the marketing sizes read as such. A projection is an estimate: measure with
``mimscale pretrain`` (``perf/mem_peak_gb``) before trusting a tight fit.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError

GB = float(1 << 30)
IMAGENET_1K_TRAIN = 1_281_167

#: GPU -> (memory in GB, key into mimscale.telemetry.mfu.PEAK_TFLOPS). h100-80gb is the SXM part.
GPUS: dict[str, tuple[float, str]] = {
    "a100-40gb": (40.0, "a100"),
    "a100-80gb": (80.0, "a100"),
    "h100-80gb": (80.0, "h100-sxm"),
    "h100-pcie": (80.0, "h100-pcie"),
    "h200": (141.0, "h200"),
}

#: 16-bit elements saved per token per channel of width by one pre-norm ViT block (see module doc).
ACT_ELEMS = 16
ACT_BYTES = 2  # bf16 / fp16 activations
STATE_BYTES = {"param16": 2, "grad16": 2, "optim": 12}  # mixed-precision Adam, per parameter
DEFAULT_OVERHEAD_GB = 2.0
DEFAULT_MFU = 0.45

# DeepSpeed defaults for keys a ds_configs file leaves out.
_DS_DEFAULTS = {
    "allreduce_bucket_size": 5e8,
    "reduce_bucket_size": 5e8,
    "overlap_comm": None,
    "contiguous_gradients": True,
    "stage3_max_live_parameters": 1e9,
}


@dataclass
class PlanInput:
    model: str
    patch: int = 16
    img: int = 224
    objective: str = "mae"
    objective_knobs: dict[str, Any] = field(default_factory=dict)
    gpu: str = "a100-80gb"
    zero: int = 1
    micro_batch: int = 64
    nodes: int = 1
    gpus_per_node: int = 8
    mfu: float = DEFAULT_MFU
    grad_ckpt: bool = False
    offload: bool = False
    precision: str = "bf16"
    global_batch: int | None = None  # default: micro_batch x GPUs (no accumulation)
    epochs: float | None = None
    overhead_gb: float = DEFAULT_OVERHEAD_GB
    in_chans: int = 3
    loader: str = "auto"  # data path: auto (device where the objective allows) | cpu | device | preresized
    loader_rate: float | None = None  # host samples/s per CPU core on that path (default: LOADER_RATES)


@dataclass
class BlockCall:
    """One call of a transformer block in the forward pass of one image."""

    tokens: int  # tokens per image through this call: L, or K x L when K parts are batched
    width: int  # D
    hidden: int  # MLP hidden width (for the recompute FLOPs)
    checkpointed: bool
    seq: int = 0  # sequence length L of one attention (default: tokens)


@dataclass
class ModelShape:
    params_trainable: int
    params_frozen: int
    params_encoder: int
    flops_per_sample: float
    blocks: list[BlockCall]
    other_saved_bytes: float  # per image, outside blocks
    device_decode: bool = True  # the objective's train transform runs on the device-decode path


#: Host (CPU) work of the loader in samples per CPU-second, i.e. samples/s per core, for 224 px
#: RandomResizedCrop + flip + normalise + a 75 % mask from ~500x375 JPEGs (quality 90), 2 worker processes:
#: measured by benchmarks/loader_speed.py on machine `vm` (AMD EPYC, 2 shared cores, no AVX-512),
#: results/loader_speed-vm-2026-12-04.json ("preresized": shards written with --max-side 320). "device": what
#: the workers do when the accelerator decodes (steady state, worker start-up taken out); on the GPU side the
#: main process also launches a few kernels per crop (not measured: no GPU on `vm`).
LOADER_RATES = {"cpu": 420.0, "preresized": 560.0, "device": 3360.0}
LOADER_PATHS = ("auto", "cpu", "device", "preresized")


# ----------------------------------------------------------------------------- formulas


def zero_model_state_bytes(psi: float, stage: int, n_gpus: int, offload: bool = False) -> dict[str, float]:
    """Bytes of model states per GPU (``gpu``) and per GPU on the host (``cpu``, offload only).

    ``stage 0: 16Ψ; 1: 4Ψ + 12Ψ/N; 2: 2Ψ + 14Ψ/N; 3: 16Ψ/N``; offload moves the ``12Ψ/N`` optimizer part.
    """
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"--zero {stage}: ZeRO stage must be 0, 1, 2 or 3")
    if n_gpus < 1:
        raise ConfigError(f"{n_gpus} GPUs: need at least one")
    if offload and stage == 0:
        raise ConfigError("--offload needs ZeRO stage 1, 2 or 3 (DeepSpeed offloads the partitioned optimizer)")
    n = float(n_gpus)
    p16, g16, opt = STATE_BYTES["param16"] * psi, STATE_BYTES["grad16"] * psi, STATE_BYTES["optim"] * psi
    params = p16 / n if stage >= 3 else p16
    grads = g16 / n if stage >= 2 else g16
    optim = opt / n if stage >= 1 else opt
    return {
        "params": params,
        "grads": grads,
        "optim": 0.0 if offload else optim,
        "gpu": params + grads + (0.0 if offload else optim),
        "cpu": optim if offload else 0.0,
    }


ZERO_FORMULAS = {0: "16Ψ", 1: "4Ψ + 12Ψ/N", 2: "2Ψ + 14Ψ/N", 3: "16Ψ/N"}
ZERO_OFFLOAD_FORMULAS = {1: "4Ψ (+12Ψ/N on CPU)", 2: "2Ψ + 2Ψ/N (+12Ψ/N on CPU)", 3: "4Ψ/N (+12Ψ/N on CPU)"}


def ds_config_path(stage: int, offload: bool) -> Path:
    root = Path(__file__).resolve().parent.parent / "ds_configs"
    return root / ("zero3_offload.json" if offload and stage == 3 else f"zero{stage}.json")


def zero_buffer_bytes(psi: float, stage: int, ds_zero: dict | None = None) -> tuple[float, str]:
    """Fixed DeepSpeed communication buffers per GPU (16-bit elements) and how they were counted."""
    z = {**_DS_DEFAULTS, **(ds_zero or {})}
    overlap = z["overlap_comm"] if z["overlap_comm"] is not None else stage == 3
    nbuf = 2 if overlap else 1
    if stage == 0:
        n = min(psi, float(z["allreduce_bucket_size"]))
        return 2.0 * n, f"gradient all-reduce chunk min(Ψ, {z['allreduce_bucket_size']:.0e}) x 2 B"
    if stage in (1, 2):
        if z["contiguous_gradients"]:
            n = nbuf * float(z["reduce_bucket_size"])
            return 2.0 * n, f"{nbuf} reduce bucket(s) x {z['reduce_bucket_size']:.0e} x 2 B"
        n = min(psi, float(z["reduce_bucket_size"]))
        return 2.0 * n, f"reduce bucket min(Ψ, {z['reduce_bucket_size']:.0e}) x 2 B"
    live = min(psi, float(z["stage3_max_live_parameters"]))
    n = live + nbuf * float(z["reduce_bucket_size"])
    return 2.0 * n, (
        f"gathered params min(Ψ, {z['stage3_max_live_parameters']:.0e}) + "
        f"{nbuf} x {z['reduce_bucket_size']:.0e} reduce, x 2 B"
    )


def activation_bytes(
    blocks: list[BlockCall],
    micro_batch: int,
    other_per_sample: float = 0.0,
    elems: float = ACT_ELEMS,
    nbytes: float = ACT_BYTES,
) -> dict[str, float]:
    """Saved activations of one micro-batch (see the module doc): ``blocks``, ``other`` and ``total``."""
    full = [elems * b.tokens * b.width * nbytes for b in blocks if not b.checkpointed]
    ckpt = [b for b in blocks if b.checkpointed]
    kept = sum(1.0 * b.tokens * b.width * nbytes for b in ckpt)
    rematerialised = max((elems * b.tokens * b.width * nbytes for b in ckpt), default=0.0)
    blk = micro_batch * (sum(full) + kept + rematerialised)
    other = micro_batch * other_per_sample
    return {"blocks": blk, "other": other, "total": blk + other}


def recompute_flops_per_sample(blocks: list[BlockCall]) -> float:
    """Forward FLOPs of the checkpointed blocks, done again in the backward (hardware, not model, FLOPs)."""
    from ..telemetry.flops import transformer_forward_flops

    return sum(
        b.tokens
        / (b.seq or b.tokens)
        * transformer_forward_flops(b.seq or b.tokens, b.width, 1, mlp_ratio=b.hidden / b.width)
        for b in blocks
        if b.checkpointed
    )


# ----------------------------------------------------------------------------- model on meta


def build_on_meta(
    arch: str,
    img: int,
    patch: int,
    objective: str,
    knobs: dict[str, Any] | None = None,
    in_chans: int = 3,
    grad_ckpt: bool = False,
):
    """The objective (encoder inside) built on the meta device: shapes and parameter counts, no memory."""
    import torch

    from ..config import from_dict
    from ..models.vit import ARCHS, build_vit
    from ..objectives import objective_class

    if arch not in ARCHS:
        raise ConfigError(f"--model {arch}: unknown architecture; valid: {', '.join(ARCHS)}")
    if patch < 1 or img < 1 or img % patch:
        raise ConfigError(f"--img {img} must be a positive multiple of --patch {patch}")
    cls = objective_class(objective)
    cfg = from_dict(cls.Config, dict(knobs or {}), "objective")
    with torch.device("meta"):
        obj = cls(build_vit(arch, img_size=img, patch_size=patch, in_chans=in_chans), cfg)
    obj.encoder.set_grad_checkpointing(grad_ckpt)
    obj.train()
    return obj


def model_shape(obj) -> ModelShape:
    """Parameter counts, analytic FLOPs, and the block calls / saved bytes of one image's forward."""
    import torch

    from ..models.vit import Block, VisionTransformer
    from ..telemetry.mfu import meta_bridge

    frozen = {id(p) for m in obj.frozen_modules() for p in m.parameters()}
    trainable = [p for p in obj.parameters() if p.requires_grad and id(p) not in frozen]
    psi = sum(p.numel() for p in trainable)
    phi = sum(p.numel() for p in obj.parameters() if id(p) in frozen or not p.requires_grad)
    enc = sum(p.numel() for p in obj.encoder.parameters() if p.requires_grad)

    device_decode = _has_device_path(obj)
    ckpt_blocks = {
        id(b) for m in obj.modules() if isinstance(m, VisionTransformer) and m.grad_checkpointing for b in m.blocks
    }
    calls: list[BlockCall] = []
    ckpt_inputs: set[int] = set()
    depth = [0]

    def pre(mod, args):
        depth[0] += 1
        x = args[0]
        grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in mod.parameters()))
        if grad and id(mod) in ckpt_blocks:
            ckpt_inputs.add(x.untyped_storage()._cdata)  # saved by checkpoint() itself: not "other"
        if grad:
            calls.append(
                BlockCall(
                    tokens=int(x.shape[0] * x.shape[1]),
                    width=int(x.shape[-1]),
                    hidden=int(mod.mlp.fc1.out_features),
                    checkpointed=id(mod) in ckpt_blocks,
                    seq=int(x.shape[1]),
                )
            )

    def post(mod, args, out):
        depth[0] -= 1

    own = {t.untyped_storage()._cdata for t in list(obj.parameters()) + list(obj.buffers())}
    seen: dict[int, int] = {}

    def pack(t):
        if depth[0] == 0:
            key = t.untyped_storage()._cdata
            if key not in own:
                seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        return t

    handles = []
    for m in obj.modules():
        if isinstance(m, Block):
            handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    enc_mod = obj.encoder
    g = torch.Generator().manual_seed(0)
    batch = {
        "image": torch.empty(1, enc_mod.in_chans, enc_mod.img_size, enc_mod.img_size, device="meta"),
        "label": torch.zeros(1, dtype=torch.long),
        **obj.mask_spec().generate(1, g),
    }
    try:
        with meta_bridge(obj), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            obj(batch)
    finally:
        for h in handles:
            h.remove()
    return ModelShape(
        params_trainable=psi,
        params_frozen=phi,
        params_encoder=enc,
        flops_per_sample=float(obj.flops_per_sample()),
        blocks=calls,
        other_saved_bytes=float(sum(v for k, v in seen.items() if k not in ckpt_inputs)),
        device_decode=device_decode,
    )


def _has_device_path(obj) -> bool:
    """Whether ``obj``'s train transform (around the recipe's default) can run on the device-decode path."""
    from ..data.device_decode import device_views_of
    from ..data.transforms import TrainTransform

    pe = obj.encoder.patch_embed
    try:
        tf = obj.train_transform(TrainTransform(pe.img_size, in_chans=pe.proj.in_channels))
    except Exception:
        return False
    return device_views_of(tf) is not None


# ----------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    inputs: dict[str, Any]
    n_gpus: int
    gpu_memory_gb: float
    peak_tflops: float
    params_trainable: int
    params_frozen: int
    params_encoder: int
    flops_per_sample: float
    recompute_flops_per_sample: float
    memory_gb: dict[str, float]
    memory_notes: dict[str, str]
    loader_path: str
    loader_rate: float
    loader_cores_per_gpu: float
    loader_cores_per_gpu_by_path: dict[str, float]
    cpu_memory_per_node_gb: float
    act_per_sample_gb: float
    fits: bool
    max_micro_batch: int
    images_per_s_per_gpu: float
    images_per_s_cluster: float
    global_batch: int
    grad_accum: int
    step_time_s: float
    steps_per_epoch: int
    epoch_time_s: float
    total_time_s: float | None
    total_gpu_hours: float | None
    blocks: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check(inp: PlanInput) -> None:
    if inp.gpu not in GPUS:
        raise ConfigError(f"--gpu {inp.gpu}: unknown GPU; valid: {', '.join(GPUS)}")
    if inp.precision not in ("bf16", "fp16"):
        raise ConfigError(
            f"precision '{inp.precision}': the plan models mixed-precision training; pass --precision bf16 or fp16"
        )
    for name, v in (("--micro-batch", inp.micro_batch), ("--nodes", inp.nodes), ("--gpus-per-node", inp.gpus_per_node)):
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} {v}: must be a positive integer")
    if not 0.0 < inp.mfu <= 1.0:
        raise ConfigError(f"--mfu {inp.mfu}: must be in (0, 1], e.g. 0.45")
    if inp.overhead_gb < 0:
        raise ConfigError(f"--overhead-gb {inp.overhead_gb}: must be >= 0")
    if inp.epochs is not None and inp.epochs <= 0:
        raise ConfigError(f"--epochs {inp.epochs}: must be > 0")
    if inp.loader not in LOADER_PATHS:
        raise ConfigError(f"--loader {inp.loader}: must be one of {', '.join(LOADER_PATHS)}")
    if inp.loader_rate is not None and not inp.loader_rate > 0:
        raise ConfigError(f"--loader-rate {inp.loader_rate}: must be > 0 samples/s per core")


def make_plan(inp: PlanInput, shape: ModelShape | None = None) -> Plan:
    """Project memory and time for ``inp`` (``shape``: reuse a :func:`model_shape` result)."""
    from ..telemetry.mfu import PEAK_TFLOPS

    _check(inp)
    n = inp.nodes * inp.gpus_per_node
    zero_model_state_bytes(0, inp.zero, n, inp.offload)  # validates stage / offload early
    if shape is None:
        shape = model_shape(
            build_on_meta(
                inp.model, inp.img, inp.patch, inp.objective, inp.objective_knobs, inp.in_chans, inp.grad_ckpt
            )
        )
    cap_gb, peak_key = GPUS[inp.gpu]
    peak = PEAK_TFLOPS[peak_key][inp.precision] * 1e12
    psi = float(shape.params_trainable)

    states = zero_model_state_bytes(psi, inp.zero, n, inp.offload)
    ds_path = ds_config_path(inp.zero, inp.offload)
    ds_zero = json.loads(ds_path.read_text()).get("zero_optimization", {}) if ds_path.exists() else {}
    buffers, buf_note = zero_buffer_bytes(psi, inp.zero, ds_zero)
    frozen = 2.0 * shape.params_frozen
    act1 = activation_bytes(shape.blocks, 1, shape.other_saved_bytes)
    act = activation_bytes(shape.blocks, inp.micro_batch, shape.other_saved_bytes)
    overhead = inp.overhead_gb * GB
    fixed = states["gpu"] + frozen + buffers + overhead
    total = fixed + act["total"]
    cap = cap_gb * GB
    max_mb = max(0, int(math.floor((cap - fixed) / act1["total"]))) if act1["total"] > 0 else 0

    formula = (ZERO_OFFLOAD_FORMULAS if inp.offload else ZERO_FORMULAS)[inp.zero]
    n_ckpt = sum(b.checkpointed for b in shape.blocks)
    memory = {
        "model_states": states["gpu"] / GB,
        "frozen_params": frozen / GB,
        "zero_buffers": buffers / GB,
        "activations_blocks": act["blocks"] / GB,
        "activations_other": act["other"] / GB,
        "overhead": overhead / GB,
        "total": total / GB,
    }
    notes = {
        "model_states": f"ZeRO-{inp.zero}: {formula}, Ψ = {psi / 1e6:.1f} M, N = {n}",
        "frozen_params": f"{shape.params_frozen / 1e6:.1f} M frozen x 2 B",
        "zero_buffers": f"{buf_note} ({ds_path.name})",
        "activations_blocks": (
            f"{inp.micro_batch} x {act1['blocks'] / 2**20:.1f} MB: {len(shape.blocks)} block "
            f"calls x {ACT_ELEMS} x L x D x {ACT_BYTES} B"
            + (f", {n_ckpt} checkpointed (input only + 1 re-materialised)" if n_ckpt else "")
        ),
        "activations_other": f"{inp.micro_batch} x {act1['other'] / 2**20:.1f} MB (saved outside blocks)",
        "overhead": "CUDA context, workspaces, fragmentation",
    }

    per_gpu = inp.mfu * peak / shape.flops_per_sample
    path = inp.loader
    if path == "auto":
        path = "device" if shape.device_decode else "cpu"
    elif path == "device" and not shape.device_decode:
        raise ConfigError(
            f"--loader device: objective {inp.objective}'s train transform has no device-decode path; "
            "use --loader cpu or preresized"
        )
    rate = inp.loader_rate or LOADER_RATES[path]
    cluster = per_gpu * n
    per_step = inp.micro_batch * n
    gb = inp.global_batch if inp.global_batch is not None else per_step
    if gb < 1 or gb % per_step:
        raise ConfigError(
            f"global batch {gb} is not a multiple of micro-batch x GPUs = {inp.micro_batch} x {n}; "
            "change --global-batch, --micro-batch or the GPU count"
        )
    step = gb / cluster
    epoch = IMAGENET_1K_TRAIN / cluster
    total_time = epoch * inp.epochs if inp.epochs else None
    return Plan(
        inputs=asdict(inp),
        n_gpus=n,
        gpu_memory_gb=cap_gb,
        peak_tflops=peak / 1e12,
        params_trainable=shape.params_trainable,
        params_frozen=shape.params_frozen,
        params_encoder=shape.params_encoder,
        flops_per_sample=shape.flops_per_sample,
        recompute_flops_per_sample=recompute_flops_per_sample(shape.blocks),
        memory_gb=memory,
        memory_notes=notes,
        loader_path=path,
        loader_rate=rate,
        loader_cores_per_gpu=per_gpu / rate,
        loader_cores_per_gpu_by_path={
            k: per_gpu / v for k, v in LOADER_RATES.items() if k != "device" or shape.device_decode
        },
        cpu_memory_per_node_gb=states["cpu"] * inp.gpus_per_node / GB,
        act_per_sample_gb=act1["total"] / GB,
        fits=total <= cap,
        max_micro_batch=max_mb,
        images_per_s_per_gpu=per_gpu,
        images_per_s_cluster=cluster,
        global_batch=gb,
        grad_accum=gb // per_step,
        step_time_s=step,
        steps_per_epoch=IMAGENET_1K_TRAIN // gb,
        epoch_time_s=epoch,
        total_time_s=total_time,
        total_gpu_hours=(total_time * n / 3600.0) if total_time else None,
        blocks=_group_blocks(shape.blocks),
    )


def _group_blocks(blocks: list[BlockCall]) -> list[dict[str, Any]]:
    """Consecutive identical block calls merged into one row with a ``count``."""
    out: list[dict[str, Any]] = []
    for b in blocks:
        row = asdict(b)
        if out and all(out[-1][k] == row[k] for k in row):
            out[-1]["count"] += 1
        else:
            out.append({**row, "count": 1})
    return out


# ----------------------------------------------------------------------------- text


def _dur(s: float) -> str:
    if s < 120:
        return f"{s:.3g} s" if s < 10 else f"{s:.0f} s"
    if s < 2 * 3600:
        return f"{s / 60:.1f} min"
    if s < 2 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


def fit_line(p: Plan) -> str:
    used, cap = p.memory_gb["total"], p.gpu_memory_gb
    if p.fits:
        return (
            f"FIT: {used:.1f} GB of {cap:.0f} GB per GPU ({100 * used / cap:.0f}%); "
            f"largest micro-batch that fits: {p.max_micro_batch}"
        )
    hint = (
        "no micro-batch fits: raise --zero, add --grad-ckpt or --offload, or use bigger GPUs"
        if p.max_micro_batch < 1
        else f"largest micro-batch that fits: {p.max_micro_batch}; or raise --zero / add --grad-ckpt"
    )
    return f"DOES NOT FIT: {used:.1f} GB > {cap:.0f} GB per GPU; {hint}"


def format_plan(p: Plan) -> str:
    i = p.inputs
    arch = (
        i["model"]
        .replace("vit_", "ViT-")
        .replace("micro", "Micro")
        .replace("tiny", "Ti")
        .replace("small", "S")
        .replace("base", "B")
        .replace("large", "L")
        .replace("huge", "H")
    )
    ck = "on (encoder)" if i["grad_ckpt"] else "off"
    rows = [
        f"plan: {i['objective']} {arch}/{i['patch']} @{i['img']}px on {i['nodes']} x {i['gpus_per_node']} "
        f"{i['gpu']} (N = {p.n_gpus} GPUs), ZeRO-{i['zero']}{' + offload' if i['offload'] else ''}, "
        f"{i['precision']}, micro-batch {i['micro_batch']}, activation checkpointing {ck}",
        f"params      {p.params_trainable / 1e6:.1f} M trainable (encoder {p.params_encoder / 1e6:.1f} M)"
        + (f", {p.params_frozen / 1e6:.1f} M frozen" if p.params_frozen else ""),
        f"compute     {p.flops_per_sample / 1e9:.1f} GFLOP per image (analytic, training = 3x forward)"
        + (
            f"; +{p.recompute_flops_per_sample / 1e9:.1f} GFLOP recompute (hardware only)"
            if p.recompute_flops_per_sample
            else ""
        ),
        "memory per GPU (GB = 2^30 B)",
    ]
    labels = {
        "model_states": "model states",
        "frozen_params": "frozen params",
        "zero_buffers": "ZeRO buffers",
        "activations_blocks": "activations",
        "activations_other": "  + outside blocks",
        "overhead": "runtime overhead",
    }
    for k, label in labels.items():
        if k == "frozen_params" and not p.params_frozen:
            continue
        rows.append(f"  {label:18s} {p.memory_gb[k]:7.2f}   {p.memory_notes[k]}")
    rows.append(f"  {'total':18s} {p.memory_gb['total']:7.2f}   of {p.gpu_memory_gb:.0f}")
    if p.cpu_memory_per_node_gb:
        rows.append(f"  CPU RAM per node for offloaded optimizer states: {p.cpu_memory_per_node_gb:.1f} GB")
    rows.append(fit_line(p))
    rows += [
        f"throughput  {p.images_per_s_per_gpu:,.0f} img/s per GPU, {p.images_per_s_cluster:,.0f} img/s cluster "
        f"(MFU {i['mfu']:.2f} of {p.peak_tflops:g} TFLOP/s {i['precision']} dense peak)",
        f"step        global batch {p.global_batch} = {i['micro_batch']} x {p.n_gpus} GPUs x {p.grad_accum} accum: "
        f"{_dur(p.step_time_s)} per step",
        f"epoch       ImageNet-1k ({IMAGENET_1K_TRAIN:,} images, {p.steps_per_epoch} steps): {_dur(p.epoch_time_s)}, "
        f"{p.epoch_time_s * p.n_gpus / 3600:.1f} GPU-hours",
    ]
    if p.total_time_s:
        rows.append(f"run         {i['epochs']:g} epochs: {_dur(p.total_time_s)}, {p.total_gpu_hours:,.0f} GPU-hours")
    names = {"cpu": "CPU decode", "device": "device decode", "preresized": "CPU decode of pre-resized shards"}
    others = ", ".join(f"{names[k]} {v:.1f}" for k, v in p.loader_cores_per_gpu_by_path.items() if k != p.loader_path)
    measured = (
        "" if i["loader_rate"] else " (224 px crops of ~500x375 JPEGs, measured on `vm`; --loader-rate for yours)"
    )
    rows.append(
        f"loader      CPU cores per GPU the loader needs: {p.loader_cores_per_gpu:.1f} on the "
        f"{names[p.loader_path]} path = {p.images_per_s_per_gpu:,.0f} img/s / {p.loader_rate:,.0f} samples/s "
        f"per core{measured}" + (f"; {others}" if others else "")
    )
    return "\n".join(rows)


def from_recipe(recipe: str) -> dict[str, Any]:
    """PlanInput fields taken from a recipe (model, objective and its knobs, ZeRO, batches, epochs)."""
    from .. import config as C

    cfg = C.load(recipe, ["data.train=plan"])
    knobs = dict(cfg.objective)
    return dict(
        model=cfg.model.arch,
        patch=cfg.model.patch_size,
        img=cfg.model.img_size,
        in_chans=cfg.model.in_chans,
        objective=knobs.pop("name"),
        objective_knobs=knobs,
        zero=cfg.train.zero_stage,
        micro_batch=cfg.train.micro_batch_size,
        grad_ckpt=cfg.model.grad_checkpointing,
        offload=cfg.train.offload,
        precision=cfg.train.precision,
        global_batch=cfg.train.batch_size,
        epochs=cfg.train.epochs,
        loader=cfg.data.decode,
    )
