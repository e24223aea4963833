"""EMA teacher: an fp32 moving average of a student submodule, correct at every ZeRO stage.

Any objective can hold one (or several) :class:`EMATeacher` per student submodule::

    hold_outside(self, "teacher", EMATeacher(self.encoder))  # deepcopy NOW, before DeepSpeed touches the student
    def private_modules(self): return [self.teacher]          # the engine moves it to the device
    def after_optimizer_step(self, ctx):
        self.teacher.update(ctx, self.encoder, cosine_to_one(ctx.step, ctx.total_steps, 0.996))
    def checkpoint_state(self): return {"teacher": self.teacher.checkpoint_state()}

The update always reads the student's fp32 MASTER weights (the optimizer's copy under bf16 / ZeRO), so
``(1 - m) * delta`` never underflows bf16 and never reads a stale working copy. Parameters are matched by name;
buffers (e.g. BatchNorm running statistics) are not averaged.

* **ZeRO 1-2 and DeepSpeed's bf16 optimizer** (``ctx.master_fragments(student)``: the fp32 masters are split
  across ranks, each rank holds a contiguous piece of some parameters): the teacher is fp32 and replicated on
  every rank; each rank averages the pieces it holds the masters of, then ONE all-gather of all ranks' updated
  pieces brings every replica up to date (a constant number of collectives per update, not one per parameter).
* **fp32 at ZeRO-0** (neither of the above): ``ctx.master_params(student)`` gives the full values locally; every
  rank does the same update on the same values, which keeps the replicas equal (no collective).
* **ZeRO-3** (``ctx.master_shards(student)`` gives each rank's own fp32 master partition, no collective): the
  teacher is **partitioned the same way** (rank r keeps elements ``[r*p, (r+1)*p)`` of each flattened, padded
  parameter, ``p = ceil(numel / world)``) and updated there with one fused ``torch._foreach_*`` call: no gather
  per step, 1/world of the teacher per rank. The full weights of a submodule are all-gathered only while its
  ``forward`` runs (a pre-hook; freed again by a post-hook), like ZeRO-3 does for the student, so the teacher
  forward is a collective every rank runs. Parameters owned directly by the root module (e.g. a ViT's
  ``cls_token``/``pos_embed``, read outside any submodule's ``forward``) stay whole on every rank ("persistent":
  updated on the partition, then re-gathered: small). A parameter read outside its own module's ``forward``
  (other than at the root) is therefore not supported at ZeRO-3 (it would be empty: a shape error, not silence).
  :meth:`checkpoint_state` gathers the full teacher (collective: every rank calls it, as checkpoints do).

A bf16 forward casts at forward time (e.g. under ``torch.autocast``).
"""

from __future__ import annotations

import copy
import math
from typing import Any, cast

import torch
from torch import nn

from ..errors import CheckpointError


def hold_outside(owner: nn.Module, name: str, module: nn.Module) -> None:
    """Set ``owner.<name> = module`` WITHOUT registering it as a submodule.

    A teacher must stay out of the objective's module tree: DeepSpeed ZeRO-3 walks ``engine.module.parameters()``
    after every step and fails on parameters it does not manage ("no attribute 'ds_active_sub_modules'"), and
    ``objective.bfloat16()`` / ``.train()`` / ``state_dict()`` must not reach it either (fp32, own mode, saved
    via ``checkpoint_state``). Return it from ``private_modules()`` so the engine moves it to the device.
    """
    object.__setattr__(owner, name, module)


def cosine_to_one(step: int, total_steps: int, m0: float) -> float:
    """``m(it) = 1 - (1 - m0) * (1 + cos(pi * it / T)) / 2``: ``m0`` at 0, rising to 1 at ``T`` (and after)."""
    if total_steps <= 0:
        return 1.0
    it = min(max(step, 0), total_steps)
    return 1.0 - (1.0 - m0) * (1.0 + math.cos(math.pi * it / total_steps)) / 2.0


def momentum_at(schedule: str, step: int, total_steps: int, m0: float) -> float:
    """Momentum of a named schedule: ``"cosine_to_1"`` (:func:`cosine_to_one`) or ``"constant"`` (``m0``)."""
    if schedule == "cosine_to_1":
        return cosine_to_one(step, total_steps, m0)
    if schedule == "constant":
        return float(m0)
    raise ValueError(f"unknown EMA momentum schedule {schedule!r} (cosine_to_1 | constant)")


class EMATeacher(nn.Module):
    """fp32 copy of ``student`` (taken at construction), moved only by :meth:`update`.

    ``forward(*args)`` runs the copy. Its parameters have ``requires_grad=False`` and must never reach an
    optimizer: hold it with :func:`hold_outside` and return it from the objective's ``private_modules()`` (not
    ``frozen_modules()``, which would force eval mode: the mode is the objective's choice, e.g. train mode for
    BatchNorm batch statistics). ``deterministic=True`` turns stochastic depth and dropout off in the copy (a
    teacher target must not be noisy); parameter names are unchanged by that.
    """

    def __init__(self, student: nn.Module, deterministic: bool = True):
        super().__init__()
        self.module = copy.deepcopy(student).float().requires_grad_(False)
        if deterministic:
            for m in self.module.modules():
                if isinstance(m, nn.Dropout) or type(m).__name__ == "DropPath":
                    cast(Any, m).p = 0.0  # (Dropout / timm DropPath: a float attribute)
        self._shards: dict[str, _Shard] = {}  # ZeRO-3 only (after the first update): name -> partition
        self._hooks: list = []
        self.gathered_elements = 0  # elements all-gathered so far (ZeRO-3 forwards, persistent params)
        self._plan_key: tuple | None = None  # ZeRO 1-2: every rank's fp32 pieces (see _update_fragments)
        self._plan: list[list[tuple[int, int]]] = []

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    @torch.no_grad()
    def update(self, ctx, student: nn.Module, momentum: float) -> None:
        """``t = m * t + (1 - m) * s`` in fp32 for every trainable student parameter (matched by name).

        Under ZeRO-3 (``ctx.master_shards``) on each rank's own partition; otherwise from ``ctx.master_params``
        (full values; a collective under ZeRO-3). EVERY rank must call ``update`` at the same point. ``student``
        must be a submodule of the objective with the same structure as the copy. Frozen student parameters (not
        yielded) keep their copied value.
        """
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"EMA momentum {momentum} must be in [0, 1]")
        shards_of = getattr(ctx, "master_shards", None)
        shards = shards_of(student) if shards_of is not None else None
        if shards is not None:
            return self._update_shards(list(shards), momentum)
        if self._shards:
            raise RuntimeError("the EMA teacher is partitioned (ZeRO-3) but the step context gave full weights")
        fragments_of = getattr(ctx, "master_fragments", None)
        fragments = fragments_of(student) if fragments_of is not None else None
        if fragments is not None:
            return self._update_fragments(list(fragments), momentum)
        mine = dict(self.module.named_parameters())
        ts: list[torch.Tensor] = []
        vs: list[torch.Tensor] = []
        for name, value in ctx.master_params(student):
            t = self._check(mine, name, tuple(value.shape))
            ts.append(t)
            vs.append(value.to(device=t.device, dtype=torch.float32))
        self._lerp(ts, vs, momentum)

    @staticmethod
    def _check(mine: dict, name: str, shape: tuple) -> nn.Parameter:
        t = mine.get(name)
        if t is None or tuple(t.shape) != shape:
            got = None if t is None else tuple(t.shape)
            raise ValueError(f"EMA teacher has no parameter '{name}' of shape {shape} (got {got})")
        return t

    @staticmethod
    def _lerp(ts: list[torch.Tensor], vs: list[torch.Tensor], m: float) -> None:
        if not ts or m == 1.0:
            return
        if m == 0.0:
            torch._foreach_copy_(ts, vs)
        else:  # one fused kernel per op over all tensors (same maths as mul/add)
            torch._foreach_mul_(ts, m)
            torch._foreach_add_(ts, vs, alpha=1.0 - m)

    # ---------------------------------------------------- ZeRO 1-2: fp32 masters partitioned, the teacher replicated

    def _update_fragments(self, fragments: list[tuple[str, int, torch.Tensor]], m: float) -> None:
        """Each rank averages the pieces of the teacher whose fp32 masters it holds, then ONE all-gather (of
        every rank's updated pieces, packed and padded to the longest) refreshes the rest: the same collective
        count whatever the number of parameters, and each element is averaged exactly once."""
        if m == 1.0:
            return
        mine = dict(self.module.named_parameters())
        ts, vs, layout = [], [], []
        for name, start, piece in fragments:
            t = mine.get(name)
            n = piece.numel()
            if t is None or start < 0 or start + n > t.numel():
                raise ValueError(f"EMA teacher has no parameter '{name}' holding elements [{start}, {start + n})")
            layout.append((start, n))
            if n:
                ts.append(t.data.view(-1)[start : start + n])
                vs.append(piece.to(device=t.device, dtype=torch.float32))
        self._lerp(ts, vs, m)
        _, world = self._world()
        if world == 1:
            return
        import torch.distributed as tdist

        names = [name for name, _, _ in fragments]
        plan = self._fragment_plan(names, layout)
        longest = max(sum(n for _, n in ranks) for ranks in plan)
        device = next(iter(mine.values())).device
        send = torch.zeros(longest, dtype=torch.float32, device=device)
        if ts:
            torch.cat(ts, out=send[: sum(t.numel() for t in ts)])
        out = torch.empty(world, longest, dtype=torch.float32, device=device)
        tdist.all_gather(list(out.unbind(0)), send)  # [world, longest]
        rank, _ = self._world()
        dst, src = [], []
        for r, ranks in enumerate(plan):
            if r == rank:
                continue
            offset = 0
            for name, (start, n) in zip(names, ranks, strict=True):
                if n:
                    dst.append(mine[name].data.view(-1)[start : start + n])
                    src.append(out[r, offset : offset + n])
                    offset += n
        if dst:
            torch._foreach_copy_(dst, src)

    def _fragment_plan(self, names: list[str], layout: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
        """Every rank's ``(start, n)`` per parameter: exchanged once (one all-gather at the first update, checked
        to tile every parameter exactly), then reused while this rank's own layout stays the same."""
        key = (tuple(names), tuple(layout))
        if self._plan_key != key:
            import torch.distributed as tdist

            _, world = self._world()
            device = next(self.module.parameters()).device
            local = torch.tensor(layout, dtype=torch.long, device=device).reshape(len(layout), 2)
            every = torch.empty(world, *local.shape, dtype=torch.long, device=device)
            tdist.all_gather(list(every.unbind(0)), local)
            plan = [[(int(a), int(b)) for a, b in rows] for rows in every.tolist()]
            mine = dict(self.module.named_parameters())
            for i, name in enumerate(names):
                covered = sorted(ranks[i] for ranks in plan if ranks[i][1])
                pos = 0
                for start, n in covered:
                    if start != pos:
                        raise ValueError(f"EMA teacher: the ranks' fp32 pieces of '{name}' do not tile it")
                    pos += n
                if pos != mine[name].numel():
                    raise ValueError(f"EMA teacher: the ranks' fp32 pieces of '{name}' do not tile it")
            self._plan_key, self._plan = key, plan
        return self._plan

    # ---------------------------------------------------------------- ZeRO-3: the teacher on this rank's partition

    @staticmethod
    def _world() -> tuple[int, int]:
        import torch.distributed as tdist

        if tdist.is_available() and tdist.is_initialized():
            return tdist.get_rank(), tdist.get_world_size()
        return 0, 1

    def _partition(self, shards: list[tuple[str, torch.Tensor]]) -> None:
        """First ZeRO-3 update: keep only this rank's slice of every trainable parameter; hook the gathers."""
        rank, world = self._world()
        mine = dict(self.module.named_parameters())
        root = {id(p) for p in self.module.parameters(recurse=False)}
        self._shards = {}
        for name, part in shards:
            t = mine.get(name)
            if t is None:
                raise ValueError(f"EMA teacher has no parameter '{name}'")
            n, p = t.numel(), part.numel()
            if p != -(-n // world):
                raise ValueError(f"ZeRO-3 partition of '{name}' has {p} elements, expected ceil({n} / {world} ranks)")
            flat = torch.zeros(world * p, dtype=torch.float32, device=t.device)
            flat[:n] = t.detach().reshape(-1)
            persistent = id(t) in root
            self._shards[name] = _Shard(t, flat[rank * p : (rank + 1) * p].clone(), tuple(t.shape), persistent)
            if not persistent:
                t.data = torch.empty(0, dtype=torch.float32, device=t.device)
        by_param = {id(s.param): s for s in self._shards.values() if not s.persistent}
        for m in self._units():
            own = [by_param.pop(id(q)) for q in m.parameters() if id(q) in by_param]
            if own:
                self._hooks.append(m.register_forward_pre_hook(lambda mod, args, own=own: self._materialise(own)))
                self._hooks.append(m.register_forward_hook(lambda mod, args, out, own=own: self._release(own)))
        if by_param:  # pragma: no cover - a module tree we do not know
            raise ValueError(f"EMA teacher: no forward unit holds {len(by_param)} partitioned parameters")

    def _units(self) -> list[nn.Module]:
        """The gather units: each child of the teacher, and each element of a child ModuleList (a block).
        A unit gathers its whole subtree at once, so code inside it may use a submodule's weights without
        calling that submodule (fused qkv through ``F.linear``); one block's weights are whole at a time."""
        units: list[nn.Module] = []
        for child in self.module.children():
            units.extend(child if isinstance(child, (nn.ModuleList, nn.Sequential)) else [child])
        return units

    def _update_shards(self, shards: list[tuple[str, torch.Tensor]], m: float) -> None:
        if not self._shards:
            self._partition(shards)
        ts, vs = [], []
        for name, part in shards:
            s = self._shards.get(name)
            if s is None or s.local.numel() != part.numel():
                raise ValueError(f"EMA teacher has no partition '{name}' of {part.numel()} elements")
            ts.append(s.local)
            vs.append(part.reshape(-1).to(device=s.local.device, dtype=torch.float32))
        self._lerp(ts, vs, m)
        self._materialise([s for s in self._shards.values() if s.persistent])

    def _materialise(self, shards: list[_Shard]) -> None:
        """All-gather the full value of ``shards`` (one collective for all of them) into their parameters."""
        if not shards:
            return
        _, world = self._world()
        flat = torch.cat([s.local for s in shards])  # [sum p]
        if world > 1:
            import torch.distributed as tdist

            out = torch.empty(world, flat.numel(), dtype=flat.dtype, device=flat.device)
            tdist.all_gather(list(out.unbind(0)), flat)  # [world, sum p]
            self.gathered_elements += out.numel()
        else:
            out = flat.unsqueeze(0)
        offset = 0
        for s in shards:
            p = s.local.numel()
            n = math.prod(s.shape)
            # a fresh tensor: the column slice is copied by reshape (world > 1), ``flat`` is a new cat (world 1)
            s.param.data = out[:, offset : offset + p].reshape(-1)[:n].view(s.shape)
            offset += p

    @staticmethod
    def _release(shards: list[_Shard]) -> None:
        for s in shards:
            s.param.data = torch.empty(0, dtype=torch.float32, device=s.local.device)

    def local_numel(self) -> int:
        """Teacher parameter elements this rank holds outside a forward (partitions + whole parameters)."""
        held = sum(p.numel() for p in self.module.parameters())
        return held + sum(s.local.numel() for s in self._shards.values() if not s.persistent)

    def _apply(self, fn, recurse: bool = True):
        for s in self._shards.values():
            s.local = fn(s.local)
        return super()._apply(fn, recurse)

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """Parameters and buffers as CPU fp32 tensors (what a checkpoint carries). Gathers under ZeRO-3."""
        state = {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}
        names = [n for n, s in self._shards.items() if not s.persistent]
        if names:
            self._materialise([self._shards[n] for n in names])
            for n in names:
                state[n] = self._shards[n].param.detach().cpu().clone()
            self._release([self._shards[n] for n in names])
        return state

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`checkpoint_state`; keys and shapes must match exactly (CheckpointError otherwise)."""
        own = self.module.state_dict()
        shapes = {k: tuple(v.shape) for k, v in own.items()}
        shapes.update({k: s.shape for k, s in self._shards.items()})
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or extra:
            raise CheckpointError(
                f"EMA teacher state does not match the model: missing {missing[:3]}, unexpected {extra[:3]}"
            )
        bad = [k for k, v in state.items() if tuple(v.shape) != shapes[k]]
        if bad:
            raise CheckpointError(f"EMA teacher state has wrong shapes for {bad[:3]}")
        rank, world = self._world()
        with torch.no_grad():
            for k, v in own.items():
                s = self._shards.get(k)
                if s is None:
                    v.copy_(state[k].to(device=v.device, dtype=v.dtype))
                    continue
                p = s.local.numel()
                flat = torch.zeros(world * p, dtype=torch.float32)
                flat[: math.prod(s.shape)] = state[k].reshape(-1).float()
                s.local.copy_(flat[rank * p : (rank + 1) * p].to(s.local.device))
                if s.persistent:
                    s.param.data = state[k].to(device=s.local.device, dtype=torch.float32).clone()


class _Shard:
    """One ZeRO-3-partitioned teacher parameter: the module's parameter (empty outside a forward unless
    ``persistent``), this rank's fp32 slice ``local [ceil(numel / world)]`` and the full shape."""

    __slots__ = ("param", "local", "shape", "persistent")

    def __init__(self, param: nn.Parameter, local: torch.Tensor, shape: tuple, persistent: bool):
        self.param, self.local, self.shape, self.persistent = param, local, shape, persistent
