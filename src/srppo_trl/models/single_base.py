"""Single-base mode: the four SRPPO roles on ONE copy of the base weights.

SRPPO holds a policy, a critic, the SFT model (reward and KL reference) and the pretrained model (reward). When the SFT
model is the pretrained model plus a LoRA adapter, all four are views of the same base weights::

    p_PT      = base, adapters disabled
    p_SFT     = base + "sft" adapter          (frozen; the coherent reward AND the KL reference)
    policy    = base + "default" adapter      (trainable; initialised as a copy of the SFT adapter)
    critic    = base + "critic" adapter       (trainable; initialised as a copy of the SFT adapter) -> scalar head

    policy, reward_model, value_model = build_single_base(base_model, sft_adapter="path/to/sft-lora")
    SRPPOTrainer(model=policy, reward_model=reward_model, value_model=value_model, ref_model=None, ...)

The policy adapter is PEFT's "default" adapter on purpose: PEFT saves that adapter at the root of a folder, so
`trainer.save_model(dir)` writes the policy where `PeftModel.from_pretrained(base, dir)` looks (the SFT and critic
adapters go to `dir/sft/` and `dir/critic/`), and checkpoints resume through the trainer's usual adapter path.

Adapter switching. PEFT activates one adapter at a time, and `set_adapter` / `disable_adapter` also rewrite
`requires_grad` (the active adapter becomes trainable, the others frozen). So every role switches inside
[`keep_requires_grad`], which restores the flags set at build time (policy and critic adapters and the value head
train; the base and the "sft" adapter do not), whatever PEFT did in between:
- the policy runs with "default" active (the resting state: generation, scoring and the loss);
- the reward's SFT/PT passes ([`SingleBaseRewardModel`], a `CoherentRewardModel`) activate "sft" / disable the
  adapters and restore "default" on exit;
- the critic ([`SharedBaseValueModel`]) activates "critic" for its own forward and restores "default" on exit.
Without this, one reward call before `train()` froze the critic adapter and the optimizer silently left it out.
The SFT adapter never receives a gradient: it is only active under `torch.no_grad()` in scoring, or frozen under the
critic's delta adapter (below).

Opt-in, `build_single_base(..., critic_top_layers=k)`: the critic is "sft" + a zero-initialised trainable "critic"
adapter on the top k decoder layers only (both active). Its lower layers are then the SFT model's, so the SFT scoring
pass and the critic share them, computed once per rollout row (`shared_lower_layers.py`), and no backward runs through
them. This trades critic capacity for speed; the default (None) is the paper's critic, trained in every layer.
"""

from __future__ import annotations

import copy
import json
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from transformers.modeling_outputs import TokenClassifierOutput

from .coherent_reward import CoherentRewardModel, _is_peft_model
from .modeling import materialised_device
from .shared_lower_layers import SharedLowerLayers, decoder_layers


POLICY_ADAPTER = "default"
SFT_ADAPTER = "sft"
CRITIC_ADAPTER = "critic"


@contextmanager
def keep_requires_grad(module: nn.Module):
    """Restores every parameter's `requires_grad` on exit (PEFT's adapter switches rewrite them)."""
    flags = [(param, param.requires_grad) for param in module.parameters()]
    try:
        yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)


class SingleBaseRewardModel(CoherentRewardModel):
    """`CoherentRewardModel(peft_model, sft_adapter_name="sft")` whose adapter switches leave `requires_grad` alone.

    The coherent reward itself is unchanged: `p_SFT` = the "sft" adapter active, `p_PT` = adapters disabled.
    """

    @contextmanager
    def sft_context(self):
        with keep_requires_grad(self.sft_model), super().sft_context() as model:
            yield model

    @contextmanager
    def base_context(self):
        with keep_requires_grad(self.sft_model), super().base_context() as model:
            yield model


def _adapter_param_names(peft_model, adapter_name: str) -> list[str]:
    marker = f".{adapter_name}."
    return [name for name, _ in peft_model.named_parameters() if marker in name]


def _copy_adapter(peft_model, source: str, target: str) -> None:
    """Add adapter `target` to `peft_model` with the config and weights of adapter `source` (a trainable copy)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    config = copy.deepcopy(peft_model.peft_config[source])
    config.inference_mode = False
    peft_model.add_adapter(target, config)
    state = get_peft_model_state_dict(peft_model, adapter_name=source)
    result = set_peft_model_state_dict(peft_model, state, adapter_name=target)
    missing = [k for k in result.missing_keys if f".{target}." in k]
    if missing:
        raise ValueError(f"Could not copy adapter {source!r} into {target!r}: {len(missing)} weights missing.")


def _backbone(peft_model) -> nn.Module:
    causal_lm = peft_model.get_base_model()
    return getattr(causal_lm, causal_lm.base_model_prefix)


def _num_layers(peft_model) -> int:
    return peft_model.get_base_model().config.get_text_config().num_hidden_layers


def _check_critic_top_layers(peft_model, top_layers) -> int:
    """The index of the first trainable critic layer, `L - top_layers`, after checking the request can be built."""
    from peft import PeftType

    layers = _num_layers(peft_model)
    if isinstance(top_layers, bool) or not isinstance(top_layers, int) or not 1 <= top_layers < layers:
        raise ValueError(
            f"critic_top_layers must be an integer from 1 to {layers - 1} (this model has {layers} decoder layers), "
            f"got {top_layers!r}; leave it None to train every layer of the critic."
        )
    config = peft_model.peft_config[SFT_ADAPTER]
    if (
        config.peft_type != PeftType.LORA
        or getattr(config, "modules_to_save", None)
        or getattr(config, "use_dora", False)
    ):
        raise ValueError(
            "critic_top_layers needs a plain LoRA SFT adapter (no DoRA, no modules_to_save): the critic adds a second "
            "LoRA on top of it. Leave critic_top_layers=None for this adapter."
        )
    return layers - top_layers


def _add_top_layer_delta(peft_model, source: str, target: str, split: int) -> None:
    """Add adapter `target`: a zero-initialised LoRA with `source`'s rank, alpha and target modules on the decoder
    layers from `split` on (PEFT's default init: B = 0, so `source` + `target` starts equal to `source`)."""
    from peft import LoraConfig

    config = peft_model.peft_config[source]
    delta = LoraConfig(
        r=config.r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=copy.deepcopy(config.target_modules),
        exclude_modules=copy.deepcopy(getattr(config, "exclude_modules", None)),
        use_rslora=config.use_rslora,
        bias="none",
        layers_to_transform=list(range(split, _num_layers(peft_model))),
        task_type=config.task_type,
    )
    peft_model.add_adapter(target, delta)
    names = _adapter_param_names(peft_model, target)
    if not names:
        raise ValueError(
            f"The critic's LoRA matched no module of the top decoder layers (target modules "
            f"{config.target_modules!r}): PEFT could not find the layer indices; leave critic_top_layers=None."
        )


def _single_base_peft_model(base_model: nn.Module, sft_adapter):
    """A PeftModel over `base_model`'s weights holding the SFT adapter under the name "sft"."""
    from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    if _is_peft_model(base_model):
        if sft_adapter is not None:
            raise ValueError(
                "base_model is already a PEFT model holding the SFT adapter: leave sft_adapter=None, or pass the "
                "plain pretrained model with sft_adapter."
            )
        peft_model, source = base_model, base_model.active_adapter
        if any(name in peft_model.peft_config for name in (SFT_ADAPTER, CRITIC_ADAPTER) if name != source):
            raise ValueError(
                f"The PEFT model already holds adapters {sorted(peft_model.peft_config)}: pass a model holding only the "
                "SFT adapter."
            )
        if source != SFT_ADAPTER:
            _copy_adapter(peft_model, source, SFT_ADAPTER)
            if source != POLICY_ADAPTER:
                peft_model.set_adapter(SFT_ADAPTER)
                peft_model.delete_adapter(source)
        return peft_model
    if sft_adapter is None:
        raise ValueError(
            "No SFT adapter: pass sft_adapter (a saved LoRA folder or a PeftModel), or a base_model that is a PeftModel "
            "holding the SFT adapter - single-base mode needs SFT = base + adapter."
        )
    if isinstance(sft_adapter, str | Path):
        return PeftModel.from_pretrained(base_model, str(sft_adapter), adapter_name=SFT_ADAPTER, is_trainable=False)
    if _is_peft_model(sft_adapter):
        if sft_adapter.get_base_model() is base_model:
            return _single_base_peft_model(sft_adapter, None)
        # An SFT adapter held on another copy of the base: copy its weights onto `base_model` (one base is kept).
        source = sft_adapter.active_adapter
        config = copy.deepcopy(sft_adapter.peft_config[source])
        peft_model = get_peft_model(base_model, config, adapter_name=SFT_ADAPTER)
        set_peft_model_state_dict(
            peft_model, get_peft_model_state_dict(sft_adapter, adapter_name=source), adapter_name=SFT_ADAPTER
        )
        return peft_model
    raise ValueError(
        f"sft_adapter is a {type(sft_adapter).__name__}: pass the path of a saved PEFT adapter or a PeftModel."
    )


@contextmanager
def _no_activation_checkpointing(module: nn.Module):
    """Turn transformers' activation checkpointing off inside `module` for one forward.

    Checkpointed layers recompute their forward during backward, and the backward of SRPPO's loss runs with the
    policy adapter active: a checkpointed critic pass would be recomputed through the wrong adapter. So in
    single-base mode checkpointing applies to the policy pass only; the critic keeps its activations.
    """
    layers = [m for m in module.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for layer in layers:
        layer.gradient_checkpointing = False
    try:
        yield
    finally:
        for layer in layers:
            layer.gradient_checkpointing = True


class SharedBaseValueModel(nn.Module):
    """The critic of single-base mode: the shared base with the "critic" adapter active, plus a scalar head.

    `forward(input_ids, attention_mask, position_ids=None)` returns a `TokenClassifierOutput` whose `logits` are the
    values, [B, T, 1] - the interface `SRPPOTrainer` expects of a critic (`check_value_model`).

    The shared PEFT model is held *without* registering it as a submodule, so `parameters()` and `state_dict()` are
    the critic's own: its adapter weights (the very tensors inside the PEFT model) and the head. Hence the trainer's
    critic learning rate applies to exactly these, and `save_pretrained` writes only them (`model.safetensors`).
    """

    def __init__(self, peft_model, adapter_name: str = CRITIC_ADAPTER, base_adapters: tuple[str, ...] = ()):
        super().__init__()
        object.__setattr__(self, "_peft_model", peft_model)  # shared, not a submodule
        self.adapter_name = adapter_name
        # Frozen adapters active under the critic's own (critic_top_layers: the SFT adapter, the critic a delta on it).
        self.base_adapters = tuple(base_adapters)
        self.shared_lower_layers = None  # a `SharedLowerLayers` when the critic trains only its top layers
        self.top_layers = None  # `critic_top_layers` of `build_single_base` (None: every layer)
        params = dict(peft_model.named_parameters())
        names = _adapter_param_names(peft_model, adapter_name)
        if not names:
            raise ValueError(f"The PEFT model has no adapter named {adapter_name!r} for the critic.")
        self.adapter_weights = nn.ParameterDict({name.replace(".", "__"): params[name] for name in names})
        base = peft_model.get_base_model()
        self.config = base.config
        # The width of the last hidden state: the LM head's input (OPT-350m projects 1024 -> 512 before it, so
        # hidden_size is not always it), else the text config's hidden_size (multimodal configs nest it).
        head = base.get_output_embeddings()
        hidden = getattr(head, "in_features", None) or self.config.get_text_config().hidden_size
        self.score = nn.Linear(hidden, 1)
        # OpenRLHF's value-head init, as `modeling.init_value_head` (see there why not initializer_range).
        nn.init.normal_(self.score.weight, std=1.0 / (hidden + 1))
        nn.init.zeros_(self.score.bias)
        self.score.to(device=_head_device(base), dtype=next(base.parameters()).dtype)

    @property
    def peft_model(self):
        return self._peft_model

    @contextmanager
    def critic_adapter(self):
        """Activate the critic adapter (after `base_adapters`); on exit restore the previous adapter. `requires_grad` is
        never changed."""
        peft_model = self._peft_model
        previous = peft_model.active_adapter
        with keep_requires_grad(peft_model):
            if self.base_adapters:  # several active adapters: the tuner's set_adapter (PeftModel's takes one name)
                peft_model.base_model.set_adapter([*self.base_adapters, self.adapter_name])
            else:
                peft_model.set_adapter(self.adapter_name)
        try:
            yield peft_model
        finally:
            with keep_requires_grad(peft_model):
                peft_model.set_adapter(previous)

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs) -> TokenClassifierOutput:
        with self.critic_adapter() as peft_model:
            causal_lm = peft_model.get_base_model()
            backbone = getattr(causal_lm, causal_lm.base_model_prefix)
            with _no_activation_checkpointing(backbone):
                hidden = backbone(
                    input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
                ).last_hidden_state
        # With a `device_map` the last hidden state is where the last layer ran, which the head follows (a no-op
        # otherwise); an fp32 head (fp16 training) reads it in fp32.
        weight = self.score.weight
        return TokenClassifierOutput(logits=self.score(hidden.to(device=weight.device, dtype=weight.dtype)))

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        self._peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)

    def gradient_checkpointing_disable(self):
        self._peft_model.gradient_checkpointing_disable()

    def save_pretrained(self, save_directory, safe_serialization: bool = True, state_dict=None, **kwargs) -> None:
        """Writes the critic adapter and the head to `save_directory/model.safetensors` (never pickle); `state_dict`:
        the gathered weights to write instead of this module's (ZeRO-3/FSDP, see `SRPPOTrainer._save`)."""
        from safetensors.torch import save_file

        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        if state_dict is None:
            state_dict = self.state_dict()
        else:
            own = set(self.state_dict())
            state_dict = {k: v for k, v in state_dict.items() if k in own}
        save_file({k: v.detach().contiguous() for k, v in state_dict.items()}, folder / "model.safetensors")
        (folder / "critic_config.json").write_text(
            json.dumps(
                {
                    "adapter_name": self.adapter_name,
                    "base_adapters": list(self.base_adapters),
                    "critic_top_layers": self.top_layers,
                    "hidden_size": self.score.in_features,
                }
            )
        )


def _head_device(base: nn.Module):
    """Where the value head lives: where the LM head runs (its accelerate hook's execution device when the model is
    dispatched with a `device_map`, whose offloaded weights sit on `meta`), else the first materialised weight's."""
    lm_head = base.get_output_embeddings()
    device = getattr(getattr(lm_head, "_hf_hook", None), "execution_device", None)
    if device is not None:
        return torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    return materialised_device(lm_head if lm_head is not None else base)


def build_single_base(base_model: nn.Module, sft_adapter=None, critic_top_layers: int | None = None):
    """Policy, reward and critic of SRPPO on one copy of `base_model`'s weights.

    Args:
        base_model: the pretrained causal LM (`p_PT`), or a `PeftModel` over it that holds the SFT adapter (then
            leave `sft_adapter=None`; the model is modified in place).
        sft_adapter: the SFT LoRA adapter: the path of a folder saved with `save_pretrained`, or a `PeftModel`
            (its active adapter's config and weights are copied onto `base_model`).
        critic_top_layers: opt-in, a speed/capacity trade-off (None: the paper's critic, every layer trains). With
            `k`, the critic is the SFT model plus a trainable zero-initialised "critic" LoRA adapter (the SFT
            adapter's rank, alpha and target modules) on its top `k` decoder layers only, so it starts exactly at
            the SFT backbone, as the default one. Its lower layers are the frozen SFT model's: no backward runs
            through them, and the SFT scoring pass and the critic passes of a rollout buffer compute them once per
            row ([`shared_lower_layers.SharedLowerLayers`], installed by `SRPPOTrainer`). A critic with
            fewer trainable layers may fit the returns less well: see docs/performance.md for what it buys and what
            was measured of its learning.

    Returns:
        `(policy, reward_model, value_model)` for `SRPPOTrainer(model=policy, reward_model=reward_model,
        value_model=value_model, ref_model=None)`: the policy is the shared `PeftModel` with its trainable "default"
        adapter active; the reward is a `CoherentRewardModel(policy, sft_adapter_name="sft")` ([`SingleBaseRewardModel`]) (so the KL reference is
        the frozen "sft" adapter and one SFT pass serves the KL and the reward); the critic is a
        [`SharedBaseValueModel`]. The policy and critic adapters start as copies of the SFT adapter, so the policy
        starts exactly at the SFT model and the critic's backbone is the SFT backbone (as in four-model mode).
    """
    peft_model = _single_base_peft_model(base_model, sft_adapter)
    if critic_top_layers is not None:
        split = _check_critic_top_layers(peft_model, critic_top_layers)
    if POLICY_ADAPTER not in peft_model.peft_config:
        _copy_adapter(peft_model, SFT_ADAPTER, POLICY_ADAPTER)
    if critic_top_layers is None:
        _copy_adapter(peft_model, SFT_ADAPTER, CRITIC_ADAPTER)
    else:
        _add_top_layer_delta(peft_model, SFT_ADAPTER, CRITIC_ADAPTER, split)
    peft_model.set_adapter(POLICY_ADAPTER)
    # The trainable set, fixed here once: the policy and critic adapters; the base and the SFT adapter stay frozen.
    for name, param in peft_model.named_parameters():
        param.requires_grad_(f".{POLICY_ADAPTER}." in name or f".{CRITIC_ADAPTER}." in name)
    if critic_top_layers is None:
        value_model = SharedBaseValueModel(peft_model, CRITIC_ADAPTER)
    else:
        value_model = SharedBaseValueModel(peft_model, CRITIC_ADAPTER, base_adapters=(SFT_ADAPTER,))
        value_model.top_layers = critic_top_layers
        backbone = _backbone(peft_model)
        value_model.shared_lower_layers = SharedLowerLayers(
            backbone, decoder_layers(backbone, _num_layers(peft_model)), split, SFT_ADAPTER
        )
    reward_model = SingleBaseRewardModel(peft_model, sft_adapter_name=SFT_ADAPTER)
    return peft_model, reward_model, value_model


def is_single_base(policy: nn.Module, reward_model: nn.Module) -> bool:
    """True when `policy` is the PEFT model of a single-base `CoherentRewardModel`, with another adapter active."""
    return (
        isinstance(reward_model, CoherentRewardModel)
        and reward_model.single_base
        and reward_model.sft_model is policy
        and reward_model.sft_adapter_name is not None
        and getattr(policy, "active_adapter", None) != reward_model.sft_adapter_name
    )


__all__ = [
    "CRITIC_ADAPTER",
    "POLICY_ADAPTER",
    "SFT_ADAPTER",
    "SharedBaseValueModel",
    "SingleBaseRewardModel",
    "build_single_base",
    "is_single_base",
    "keep_requires_grad",
]
