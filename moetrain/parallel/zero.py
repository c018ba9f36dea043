"""DeepSpeed ZeRO-1/2 as a data-parallel strategy (``parallel.dp_strategy=deepspeed``); imports deepspeed lazily.

The engine is built by ``deepspeed.initialize`` from a config derived from moetrain's (:func:`deepspeed_config`,
no second JSON). The model itself stays DeepSpeed-free:

- Experts: DeepSpeed flattens parameters into its own buffers and cannot take DTensors, so with ep > 1 each
  expert weight (a DTensor ``Shard(0)`` over ep after :func:`apply_expert_parallel` and initialisation) becomes a
  plain parameter holding this rank's ``[E/ep, ...]`` block; :meth:`GroupedExperts.local_weights` and the all-to-all
  dispatcher run on it unchanged. DeepSpeed learns which parameters are experts from ``allreduce = False`` and
  ``group_name = "ep_size_{ep}"`` on them, optimizer groups split by
  ``split_params_into_different_moe_groups_for_optimizer``, and a parameter-free marker module subclassing
  DeepSpeed's MoE (:class:`_ExpertGroups`; the engine turns its MoE handling on only for such a module) whose
  ``set_deepspeed_parallelism`` creates DeepSpeed's expert groups: contiguous ranks, as moetrain's mesh.
- Gradients: DeepSpeed averages dense gradients over the dp ranks, and reduces expert gradients over the
  expert-data-parallel ranks divided by dp (DESIGN.md, measured). The loss is multiplied by dp in
  :meth:`backward`, giving the strategy contract: dense summed over dp, experts summed over edp.
- Accumulation: moetrain decides the boundary (:meth:`accumulating`), not DeepSpeed's micro-step counter, so a
  batch-size ramp (a varying number of micro-batches) works; ``gradient_accumulation_steps`` is nominal.
- Clipping and the step: DeepSpeed clips inside its step with ``gradient_clipping = optim.grad_clip``;
  :meth:`clip_grad_norm` only reads the same global norm beforehand (the trainer skips non-finite steps).
- Checkpoints: :meth:`state_dict` gives the same state as ``get_state_dict`` on an FSDP or single-process model
  (fully-qualified names, global shapes, fp32 master weights, per-parameter Adam states), gathered from ZeRO's
  partitions, so the checkpoint manager writes it with DCP and any strategy and layout can resume it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from moetrain.model.moe import MoE
from moetrain.parallel.mesh import ParallelMesh, local_tensor
from moetrain.parallel.strategy import DataParallelStrategy

# NOTE: DeepSpeed prints a progress line every steps_per_print steps; moetrain's metrics log instead.
_NEVER = 2**62
_ADAM_STATES = ("exp_avg", "exp_avg_sq")


def deepspeed_config(micro_batch_size: int, grad_accum_steps: int, grad_clip: float, zero_stage: int,
                     offload_optimizer: bool, bf16: bool) -> dict:
    """The DeepSpeed config of a moetrain run (the only one: nothing is read from a JSON file)."""
    zero = {"stage": zero_stage, "contiguous_gradients": True}  # ZeRO-2 with experts requires contiguous ones
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "gradient_clipping": grad_clip,  # DeepSpeed's default is 1.0, not off: always moetrain's value
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,  # moetrain's torch AdamW (no fused-Adam build)
        "zero_force_ds_cpu_optimizer": False,  # offload with torch AdamW on the CPU partitions
        "steps_per_print": _NEVER,
        "wall_clock_breakdown": False,
    }


def _expert_group_name(ep: int) -> str:
    return f"ep_size_{ep}"


class _Engined(nn.Module):
    """What the engine wraps: the model, plus the expert-group marker when there are experts to group.

    Returns the model's output as a dict, which the engine walks to hook its backward prologue onto the tensors;
    :class:`_Forward` turns it back into the model's output type.
    """

    def __init__(self, model: nn.Module, marker: nn.Module | None):
        super().__init__()
        self.model = model
        if marker is not None:
            self.expert_groups = marker

    def forward(self, *args):
        out = self.model(*args)
        return type(out), {name: getattr(out, name) for name in out.__dataclass_fields__}


class _Forward:
    """The callable the trainer runs forward on: the engine's forward, the model's output type."""

    def __init__(self, engine):
        self.engine = engine

    def __call__(self, *args):
        cls, fields = self.engine(*args)
        return cls(**fields)


def _marker_class():
    from deepspeed.moe.layer import MoE as DeepSpeedMoE
    from deepspeed.utils import groups

    class _ExpertGroups(DeepSpeedMoE):
        """Tells the engine there are experts and makes its expert groups; no parameters, never called."""

        def __init__(self, num_experts: int, ep: int):
            nn.Module.__init__(self)  # NOTE: not DeepSpeedMoE.__init__: it would build DeepSpeed's own experts
            self.num_experts, self.ep_size = num_experts, ep
            self.num_local_experts = num_experts // ep
            self.expert_group_name = _expert_group_name(ep)

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            if self.expert_group_name not in groups._get_expert_parallel_group_dict():
                groups._create_expert_and_data_parallel(self.ep_size)

        def forward(self, *args, **kwargs):
            raise RuntimeError("_ExpertGroups only marks expert parameters for DeepSpeed")

    return _ExpertGroups


class DeepSpeedStrategy(DataParallelStrategy):
    def __init__(self, mesh: ParallelMesh, config: dict):
        super().__init__(mesh)
        self.loss_scale = float(mesh.dp)  # DeepSpeed divides dense and expert gradients by dp (module docstring)
        self.config = config
        self.engine = None
        self.expert_names: set[str] = set()  # parameters holding this rank's [E/ep, ...] block
        self.n_experts = 0
        self.group_layout: list[tuple[list[str], dict]] = []  # build_optimizer's groups: names, hyperparameters
        self._pending = False  # gradients accumulated that no step has consumed yet

    # ------------------------------------------------------------------------------------------- set-up
    def wrap(self, model: nn.Module, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]):
        import deepspeed
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        marker = self._localize_experts(model)
        optimizer = make_optimizer(model)
        names = {p: n for n, p in model.named_parameters()}
        self.group_layout = [([names[p] for p in g["params"]], {k: v for k, v in g.items() if k != "params"})
                             for g in optimizer.param_groups]
        groups = [dict(g, name=f"group_{i}") for i, g in enumerate(optimizer.param_groups)]  # the split wants names
        if marker is not None:
            groups = split_params_into_different_moe_groups_for_optimizer(groups)
        optimizer.param_groups.clear()  # no state yet: regrouping is all
        for group in groups:
            optimizer.add_param_group(group)
        buffer_dtypes = {name: b.dtype for name, b in model.named_buffers()}
        self.engine, ds_optimizer, _, _ = deepspeed.initialize(model=_Engined(model, marker), optimizer=optimizer,
                                                               config=self.config)
        # NOTE: with bf16 the engine casts the whole module; buffers (router biases) stay fp32 as moetrain keeps them.
        for name, b in model.named_buffers():
            if b.dtype != buffer_dtypes[name]:
                b.data = b.data.to(buffer_dtypes[name])
        self.engine.set_gradient_accumulation_boundary(True)
        return _Forward(self.engine), ds_optimizer

    def _localize_experts(self, model: nn.Module):
        """Expert DTensors -> plain parameters of this rank's block, marked for DeepSpeed; the marker, or None."""
        if self.mesh.ep == 1:
            return None
        n_experts = None
        for module_name, moe in model.named_modules():
            if not isinstance(moe, MoE):
                continue
            experts, n_experts = moe.experts, moe.experts.n_experts
            self.n_experts = n_experts
            for name in ("w1", "w2", "w3"):
                w = getattr(experts, name)
                local = nn.Parameter(w.to_local() if isinstance(w, DTensor) else w, requires_grad=w.requires_grad)
                local.allreduce, local.group_name = False, _expert_group_name(self.mesh.ep)
                setattr(experts, name, local)
                self.expert_names.add(f"{module_name}.experts.{name}")
        return None if n_experts is None else _marker_class()(n_experts, self.mesh.ep)

    # ------------------------------------------------------------------------------------------- training
    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss * self.loss_scale, scale_wrt_gas=False)
        self._pending = True

    @contextlib.contextmanager
    def accumulating(self, module):
        self.engine.set_gradient_accumulation_boundary(False)
        try:
            yield
        finally:
            self.engine.set_gradient_accumulation_boundary(True)

    def clip_grad_norm(self, model: nn.Module, max_norm: float,
                       uncounted: frozenset[int] = frozenset()) -> torch.Tensor:
        """The global gradient norm over every partition (DeepSpeed's own); the clipping happens in :meth:`step`.
        (``uncounted`` is for pipeline stages, which DeepSpeed does not run.)"""
        opt = self.engine.optimizer
        return torch.as_tensor(opt.scaled_global_norm(), dtype=torch.float32) / opt.loss_scale

    def step(self, optimizer) -> None:
        self.engine.step()
        self._pending = False

    def zero_grad(self, optimizer) -> None:
        if self._pending:  # the trainer skipped this step (non-finite): drop what backward reduced
            _discard_gradients(self.engine.optimizer)
            self._pending = False
        optimizer.zero_grad(set_to_none=True)

    # ---------------------------------------------------------------------------------------- checkpoints
    def state_dict(self, model: nn.Module, optimizer) -> tuple[dict, dict]:
        """(model, optimizer) state as ``get_state_dict`` gives it for an unsharded model: names, global shapes,
        fp32 master weights, one Adam state per parameter (gathered from ZeRO's partitions; collective)."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        params = dict(model.named_parameters())
        model_sd = {k: v for k, v in model.state_dict().items() if k not in params}  # buffers
        # Before the first step there is no Adam state yet: zeros, as torch's get_state_dict makes (a load fills it).
        step = self._adam_step(optimizer)
        if step is None:
            step = self._init_adam_state(optimizer)[0]
        _link_adam_state(optimizer)
        state = {}
        for name, p in params.items():
            model_sd[name] = self._global(name, safe_get_full_fp32_param(p))
            state[name] = {"step": step.clone()} | {
                key: self._global(name, safe_get_full_optimizer_state(p, key)) for key in _ADAM_STATES}
        lr = optimizer.param_groups[0]["lr"]
        groups = [dict(hyper, lr=lr, params=names) for names, hyper in self.group_layout]
        return model_sd, {"state": state, "param_groups": groups}

    def load_state_dict(self, model: nn.Module, optimizer, model_sd: dict, optim_sd: dict | None) -> None:
        """Set the model (and, given ``optim_sd``, ZeRO's fp32 masters and Adam states) from a state dict of
        :meth:`state_dict`'s form."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in model_sd.items():
                value = self._block(name, local_tensor(value))
                if name in params:
                    params[name].copy_(value)
                    safe_set_full_fp32_param(params[name], value.float())
                else:
                    model.get_buffer(name).copy_(value)
            if optim_sd is None:
                return
            steps = [st["step"] for st in optimizer.optimizer.state.values()]  # made by state_dict
            for name, p in params.items():
                saved = optim_sd["state"][name]
                for key in _ADAM_STATES:
                    safe_set_full_optimizer_state(p, local_tensor(saved[key]).float(), key)
                for step in steps:
                    step.fill_(float(saved["step"]))
            hyper = optim_sd["param_groups"][0]
            for group in optimizer.param_groups:
                group["lr"] = hyper["lr"]

    def _block(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """This rank's expert block of a full expert tensor (e.g. Hugging Face weights), else ``t``."""
        if name not in self.expert_names or self.mesh.ep == 1 or t.shape[0] != self.n_experts:
            return t
        n = self.n_experts // self.mesh.ep
        return t[self.mesh.ep_rank * n:(self.mesh.ep_rank + 1) * n]

    def _global(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """An expert block as the DTensor of the whole expert weight (sharded over ep), else ``t``."""
        if name not in self.expert_names:
            return t
        return DTensor.from_local(t, self.mesh.device_mesh["ep"], [Shard(0)], run_check=False)

    @staticmethod
    def _adam_step(optimizer) -> torch.Tensor | None:
        """The step count of DeepSpeed's inner optimizer (one per flat partition, all equal); None before any."""
        for st in optimizer.optimizer.state.values():
            if "step" in st:
                return st["step"]
        return None

    @staticmethod
    def _init_adam_state(optimizer) -> list[torch.Tensor]:
        """Create zero Adam states on ZeRO's flat fp32 partitions (torch creates them at the first step) and link
        them to the parameters; returns the partitions' step tensors (one each: AdamW increments each)."""
        inner, steps = optimizer.optimizer, []
        for flat in optimizer.single_partition_of_fp32_groups:
            steps.append(torch.zeros((), dtype=torch.float32))
            inner.state[flat] = {"step": steps[-1], "exp_avg": torch.zeros_like(flat),
                                 "exp_avg_sq": torch.zeros_like(flat)}
        _link_adam_state(optimizer)
        return steps


def _link_adam_state(opt) -> None:
    """Point every parameter's fragment at its partition's Adam states.

    NOTE: ZeRO links them once, right after the first group's first step, when the other groups have no state
    yet (DeepSpeed 0.19.8), so with several groups (decay, no decay, experts) it is redone here.
    """
    opt._hp_optimizer_states_linked = False
    opt._lazy_init_hp_params_optimizer_state()


def _discard_gradients(opt) -> None:
    """Drop the reduced gradients of a step that is not taken (what ZeRO's own step does on an overflow)."""
    opt.zero_grad(set_to_none=True)
    opt._release_preflattened_grad_buffers()
    if opt.cpu_offload:
        opt.reset_cpu_buffers()
    else:
        for k in opt.averaged_gradients.keys():
            opt.averaged_gradients[k] = None
            opt.all_grad_tensors[k] = None

