"""Device strictness, checked for EVERY registered objective (``mimscale.objectives.available()``).

The objective, its teachers and a collated batch are moved to PyTorch's ``meta`` device (tensors with a shape
and a dtype but no storage) exactly as the engine places them (frozen and private modules out of the cast,
the rest in the training precision), then one training step's objective side runs: ``before_step``,
``forward``, the metrics through the Trainer's step-flag packing (:meth:`StepFlags.pack`) and ``backward``.
On ``meta`` this catches, on a CPU, two classes of bugs that only a GPU run would otherwise show:

* a tensor made inside the step without ``device=`` lands on the CPU: mixing it with the batch fails
  ("Expected all tensors to be on the same device"; on CUDA the same crash, at the first logging step when it
  sits in the metrics);
* a data-dependent shape or host read (``nonzero``, boolean-mask indexing, ``.item()``, ``bool(tensor)``,
  ``.tolist()``) cannot run on ``meta``: each of those is a host synchronisation that stalls a CUDA stream;
* a blocking host-to-device copy (``torch.tensor(..., device=)``, ``cpu_tensor.to(device)`` without
  ``non_blocking``) runs on ``meta`` but is recorded by :class:`HostCopies` (on CUDA it waits for the stream)
  in the second step (constants made once, in the first, are fine).

Objectives added later (built in or through the ``mimscale.objectives`` entry points) are picked up by the
parametrisation; ``VARIANTS`` adds the knobs that switch to other step-side code paths.
"""

from __future__ import annotations

import dataclasses

import pytest
import test_contract as contract
import torch
from torch.overrides import TorchFunctionMode

from mimscale.engine.deepspeed import _detached
from mimscale.engine.flags import FLAGS, StepFlags
from mimscale.masking import MaskSpec, random_masks, visible_indices
from mimscale.objectives import Objective, StepContext, available

META = torch.device("meta")

#: (objective, knob changes) of code paths the tiny defaults do not take
VARIANTS: list[tuple[str, dict]] = [
    ("conmim", {"mask_type": "block"}),
    ("dtm", {"teacher_norm": "clip"}),
    ("dtm", {"split": "random", "loss": "mse", "normalize_target": True}),
    ("emae", {"parts_chunk": 1}),  # chunks under activation checkpointing: the recompute path
    ("adpe", {"adv_type": 2}),  # coordinate mode
]
CASES = [(n, {}) for n in sorted(available())] + [v for v in VARIANTS if v[0] in available()]


def _id(case: tuple[str, dict]) -> str:
    name, knobs = case
    return name + "".join(f"-{k}={v}" for k, v in knobs.items())


def build(name: str, knobs: dict, checkpointing: bool = False) -> Objective:
    torch.manual_seed(0)
    cls = available()[name]
    enc = contract.build_vit(
        "vit_micro", img_size=contract.IMG, patch_size=contract.PATCH, depth=2, drop_path_rate=0.1
    )  # drop-path on: its per-sample draw is step code too
    obj = cls(enc, dataclasses.replace(cls.tiny_config(), **knobs))
    obj.encoder.grad_checkpointing = checkpointing
    return obj


def placed(obj: Objective, dtype: torch.dtype, device: torch.device = META) -> Objective:
    """The objective as the engine places it, on ``device``: frozen and private modules taken out of the tree
    (they stay attributes) and kept in their own dtype; of the rest, the PARAMETERS are cast to the training
    ``dtype`` and buffers keep theirs (DeepSpeed 0.19 casts parameters only: e.g. BatchNorm running statistics
    stay fp32 beside bf16 weights)."""
    outside = obj.frozen_modules() + obj.private_modules()
    with _detached(obj, outside, permanent=True):
        for prm in obj.parameters():
            prm.data = prm.data.to(dtype)
    obj.to(device)
    for m in outside:
        m.to(device)
    return obj.train()


def on_meta(obj: Objective, dtype: torch.dtype) -> Objective:
    return placed(obj, dtype, META)


def meta_batch(batch: dict) -> dict:
    return {k: v.to(META) if torch.is_tensor(v) else v for k, v in batch.items()}


def on_device(t: torch.Tensor) -> bool:
    return t.device == META


class HostCopies(TorchFunctionMode):
    """Records blocking host-to-device copies made under it: ``torch.tensor``/``torch.as_tensor`` of host data
    with a non-CPU ``device=``, and ``.to``/``.cuda``/``.copy_`` from a CPU tensor to another device without
    ``non_blocking=True``. ``self.copies``: what was called and from where."""

    def __init__(self):
        super().__init__()
        self.copies: list[str] = []

    def _record(self, func) -> None:
        import traceback

        frame = next((f for f in reversed(traceback.extract_stack()[:-2]) if "/mimscale/" in f.filename), None)
        where = f"{frame.filename.split('/mimscale/')[-1]}:{frame.lineno}" if frame else "?"
        self.copies.append(f"{getattr(func, '__name__', func)} at mimscale/{where}")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in (torch.tensor, torch.as_tensor):
            dev = kwargs.get("device")
            if dev is not None and torch.device(dev).type != "cpu" and not torch.is_tensor(args[0]):
                self._record(func)
        elif func in (torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.copy_) and not kwargs.get("non_blocking"):
            src = args[1] if func is torch.Tensor.copy_ else args[0]
            dst = args[0] if func is torch.Tensor.copy_ else out
            if torch.is_tensor(src) and torch.is_tensor(dst) and src.device.type == "cpu" and dst.device.type != "cpu":
                self._record(func)
        return out


@pytest.fixture(params=CASES, ids=_id)
def case(request) -> tuple[str, dict]:
    return request.param


@pytest.mark.parametrize(
    "dtype,checkpointing", [(torch.float32, False), (torch.bfloat16, True)], ids=["fp32", "bf16-ckpt"]
)
def test_step_runs_on_the_meta_device(case, dtype, checkpointing):
    """forward + metrics packing + backward with everything on ``meta``: no CPU tensor, no host sync
    (bf16 with activation checkpointing, as the large recipes train)."""
    name, knobs = case
    obj = build(name, knobs, checkpointing)
    batch = contract.make_batch(obj)  # the real collate on CPU (train_transform also primes e.g. DTM's norm)
    obj = on_meta(obj, dtype)
    batch = meta_batch(batch)  # the loader's copy, before the step
    obj.before_step(StepContext(step=0, total_steps=10))
    obj(batch)  # a first step may make its constants once (lazily); copies are counted from the second
    with HostCopies() as copies:
        obj.before_step(StepContext(step=1, total_steps=10))
        out = obj(batch)
    assert on_device(out.loss) and out.loss.shape == () and out.loss.dtype == torch.float32
    cpu = [k for k, v in out.metrics.items() if not on_device(v)]
    assert cpu == [], f"{name}: metrics made off the step's device (without device=): {cpu}"
    flags = StepFlags(META)
    with copies:
        packed, keys = flags.pack(
            ~torch.isfinite(out.loss.detach()),
            metrics={k: v.detach() for k, v in out.metrics.items()},
            count=1,
            signal=False,
            save_due=True,
        )
    assert packed.device == META and packed.shape == (len(FLAGS) + 1 + len(out.metrics),)
    assert keys == sorted(out.metrics)
    assert copies.copies == [], f"{name}: blocking host-to-device copies in the step: {copies.copies}"
    out.loss.backward()
    trainable = [p for p in obj.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and on_device(p.grad) for p in trainable)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_step_runs_with_the_engines_mixed_precision_placement(case, dtype):
    """The same step on the CPU with real numbers: ``meta`` checks devices and shapes, not dtype agreement, and
    parameters in bf16 beside fp32 buffers (DeepSpeed's placement) break ops that take both (ConMIM's projector
    BatchNorm did: "expected scalar type BFloat16 but found Float", on CUDA as on the CPU)."""
    name, knobs = case
    obj = build(name, knobs)
    batch = contract.make_batch(obj)
    obj = placed(obj, dtype, torch.device("cpu"))
    obj.before_step(StepContext(step=0, total_steps=10))
    out = obj(batch)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    trainable = [p for p in obj.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and p.grad.dtype == dtype for p in trainable)


def test_pack_refuses_nothing_it_used_to_accept_and_reduces_identically():
    """``agree`` = ``pack`` (device side) + ``reduce`` (one collective, one ``tolist``): same results as before."""
    f = StepFlags(torch.device("cpu"))
    metrics = {"loss": torch.tensor(6.0), "acc": torch.tensor(3.0)}
    packed, keys = f.pack(torch.tensor(True), metrics=metrics, count=3, time_up=True)
    assert keys == ["acc", "loss"]
    assert packed.tolist() == [1.0, 0.0, 1.0, 0.0, 0.0, 3.0, 3.0, 6.0]
    got = f.reduce(packed, keys)
    assert got.nonfinite and got.time_up and not (got.signal or got.eval_due or got.save_due)
    assert got.metrics == {"acc": 1.0, "loss": 2.0}
    assert f.agree(torch.tensor(True), metrics=metrics, count=3, time_up=True) == got
    assert f.collectives == 0  # one rank: nothing reduced


def test_a_cpu_metric_fails_the_packing_on_another_device():
    """What the harness relies on: a metric made without ``device=`` cannot be packed with device tensors."""
    f = StepFlags(META)
    with pytest.raises(RuntimeError, match="device"):
        f.pack(
            torch.zeros((), dtype=torch.bool, device=META),
            metrics={"a": torch.zeros((), device=META), "b": torch.tensor(0.5)},
            count=1,
        )


def test_host_copies_are_recorded():
    """The recorder sees the blocking forms and lets the device-side and non-blocking ones pass."""
    x = torch.zeros(3, device=META)
    with HostCopies() as rec:
        torch.tensor([1.0, 2.0], device=META)  # blocking
        torch.zeros(3).to(META)  # blocking
        x.copy_(torch.ones(3))  # blocking
        torch.zeros(3).to(META, non_blocking=True)  # fine
        torch.full((), 0.5, device=META)  # a fill: fine
        torch.as_tensor(x, device=META)  # already there: fine
    assert [c.split()[0] for c in rec.copies] == ["tensor", "to", "copy_"]


def test_meta_catches_host_syncs():
    """The failure modes the harness relies on: each of these is a host synchronisation on CUDA."""
    m = torch.zeros(2, 8, dtype=torch.bool, device=META)
    x = torch.zeros(2, 8, 3, device=META)
    for bad in (lambda: m.nonzero(), lambda: x[m], lambda: x.sum().item(), lambda: bool(m.any()), m.tolist):
        with pytest.raises((RuntimeError, NotImplementedError)):
            bad()


# ----------------------------------------------------------------------------- masking, step side


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.75])
def test_visible_indices_has_a_data_independent_shape(ratio):
    """``visible_indices(mask, num_keep)`` is fixed-shape (``[B, num_keep]`` from the config, not the data),
    runs on ``meta`` (no sync) and gives the visible patches in raster order, as the nonzero-based version did."""
    n, b = 16, 5
    mask = random_masks(b, n, ratio, torch.Generator().manual_seed(1))
    keep = n - int(mask[0].sum())
    idx = visible_indices(mask, keep)
    assert idx.shape == (b, keep) and idx.dtype == torch.long
    want = torch.stack([(~row).nonzero().flatten() for row in mask])  # reference: raster order
    assert torch.equal(idx, want)
    meta = visible_indices(mask.to(META), keep)
    assert meta.device == META and meta.shape == (b, keep)


def test_visible_indices_shape_does_not_follow_the_data():
    """The step's form takes its shape from the config even for rows that hide other counts; the counting
    form (no ``num_keep``: tests and tools, a host read) says what is wrong."""
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, :6] = True
    mask[1, :5] = True
    assert visible_indices(mask, 2).shape == (2, 2)
    with pytest.raises(ValueError, match="hide"):
        visible_indices(mask)


def test_mask_spec_generators_give_config_shapes():
    """Every collate mask kind has a shape fixed by the spec (so the step never sees a data-dependent shape)."""
    g = torch.Generator().manual_seed(0)
    n = 16
    for spec, key, shape in (
        (MaskSpec("random", n, 0.75), "mask", (3, n)),
        (MaskSpec("parts", n, 0.75, num_parts=4), "parts", (3, 4, n)),
        (MaskSpec("block", n, num_masked=6, min_block=2, exact=False), "mask", (3, n)),
        (MaskSpec("units", n, 0.5, unit=2), "mask", (3, n)),
        (MaskSpec("crops", n, 0.75, num_crops=2), "crop_masks", (3, 2, n)),
        (MaskSpec("permutation", n, least=5), "rank", (3, n)),
    ):
        assert tuple(spec.generate(3, g)[key].shape) == shape, spec.kind
