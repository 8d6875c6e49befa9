"""The critic and the module the optimizer trains (policy + critic).

The critic is a `*ForTokenClassification` model with one label: the backbone of the SFT causal LM plus a scalar head,
so it saves and loads with `save_pretrained`/`from_pretrained` like any transformers model. A one-label
`*ForSequenceClassification` model, the critic of TRL 1.12's PPO examples, works too: as TRL did, its per-token values
are its `score` head applied to every hidden state of its backbone (`getattr(model, model.base_model_prefix)`).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager, nullcontext
from types import MethodType

import torch
from torch import nn

from .logprobs import position_ids_from_attention_mask


logger = logging.getLogger(__name__)


def build_value_model(source, model_init_kwargs: dict | None = None, trust_remote_code: bool = False) -> nn.Module:
    """A critic initialised from the SFT model: its backbone plus a freshly initialised scalar head.

    Args:
        source: a path or hub id of the SFT causal LM, or the loaded causal LM itself (its weights are copied).
    """
    from transformers import AutoModelForTokenClassification

    kwargs = dict(model_init_kwargs or {})
    if isinstance(source, str):
        with _without_load_report():
            critic, info = AutoModelForTokenClassification.from_pretrained(
                source, num_labels=1, trust_remote_code=trust_remote_code, output_loading_info=True, **kwargs
            )
        missing = set(info.get("missing_keys", ()))
        # A saved critic keeps its trained head; a causal LM's folder has none and gets a fresh one.
        init_value_head(critic, only=missing)
        _log_critic_loading(source, missing, set(value_head_parameters(critic)))
        return critic
    config = source.config.__class__.from_dict(source.config.to_dict())
    config.num_labels = 1
    critic = AutoModelForTokenClassification.from_config(config, trust_remote_code=trust_remote_code)
    if not is_zero3_partitioned(critic):
        critic.to(dtype=next(source.parameters()).dtype, device=materialised_device(source))
    backbone = _backbone_prefixes(critic)
    source_names = set(source.state_dict().keys())
    not_copied = [
        name
        for name, _ in critic.named_parameters()
        if any(name.startswith(p) for p in backbone) and name not in source_names
    ]
    if not_copied:  # checked by name on every process, before any gathering
        raise ValueError(
            f"Could not copy the SFT model's backbone into the critic ({len(not_copied)} weights missing, e.g. "
            f"{not_copied[0]}): pass `value_model` explicitly."
        )
    _copy_backbone(source, critic)
    # Only weights the source did not have (a backbone whose names miss `base_model_prefix` is never re-randomised).
    init_value_head(critic, only={n for n in value_head_parameters(critic) if n not in source_names})
    return critic


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()


@contextmanager
def _without_load_report():
    """Drop transformers' "LOAD REPORT" table while building the critic: a causal LM's folder has no value head (the
    table lists it MISSING) and an LM head the critic does not use (UNEXPECTED), both by design;
    `_log_critic_loading` says what matters in one line. Every other message of `from_pretrained` still shows."""
    from transformers import modeling_utils

    drop = _DropLoadReport()
    modeling_utils.logger.addFilter(drop)
    try:
        yield
    finally:
        modeling_utils.logger.removeFilter(drop)


def _log_critic_loading(source: str, missing: set[str], head: set[str]) -> None:
    """One line on where the critic's weights come from; a warning if the backbone itself missed weights."""
    if missing & head:
        logger.info(
            "Critic: the backbone of %s and a new value head (%s), initialised by the trainer.",
            source, ", ".join(sorted(missing & head)),
        )  # fmt: skip
    else:
        logger.info("Critic: %s, with its trained value head.", source)
    if missing - head:
        logger.warning(
            "Critic: %s lacks %d backbone weights, initialised at random (e.g. %s): is it the SFT model's folder?",
            source, len(missing - head), sorted(missing - head)[0],
        )  # fmt: skip


def _copy_backbone(source: nn.Module, critic: nn.Module) -> None:
    """Copy every weight and persistent buffer of `source` that `critic` has under the same name (into the critic's
    dtype).

    Under DeepSpeed ZeRO-3 (`zero3_init_flag`) both models hold one slice of each weight per process: each pair of
    weights is gathered, copied on rank 0, and DeepSpeed broadcasts and re-partitions the critic's on exit. One pair
    at a time, so the extra memory is one weight of each model, not two whole models (a 7B pair in bf16 would need
    28 GB on every GPU at once). Buffers are never partitioned, so every process copies its own.
    """
    # Every name of a tied weight too (`remove_duplicate=False`): the critic may list it under the other name.
    source_params = dict(source.named_parameters(remove_duplicate=False))
    source_state = source.state_dict()  # under ZeRO-3 its parameters are empty slices; only its buffers are read
    with torch.no_grad():
        for name, param in critic.named_parameters():
            src = source_params.get(name)
            if src is None:
                continue
            with _gathered_params([src]), _gathered_params([param], modifier_rank=0):
                if _is_rank_zero(critic):
                    param.copy_(src)
        for name, buffer in critic.named_buffers():
            if name in source_state:  # persistent buffers only: non-persistent ones are the critic's own
                buffer.copy_(source_state[name])


def materialised_device(module: nn.Module) -> torch.device:
    """The device of `module`'s first weight that is not on the meta device (weights offloaded by accelerate's
    `device_map` sit on `meta` outside their forward); CPU if all are."""
    for param in module.parameters():
        if param.device.type != "meta":
            return param.device
    return torch.device("cpu")


def value_head_parameters(critic: nn.Module) -> dict[str, nn.Parameter]:
    """The critic's weights outside its backbone: the scalar head (`score` / `classifier`)."""
    prefixes = _backbone_prefixes(critic)
    return {n: p for n, p in critic.named_parameters() if not any(n.startswith(prefix) for prefix in prefixes)}


def init_value_head(critic: nn.Module, only: set[str] | None = None) -> None:
    """OpenRLHF's initialisation of a critic's fresh value head (openrlhf/models/model.py,
    `get_llm_for_sequence_regression(init_value_head=True)`): weight ~ N(0, 1 / (hidden_size + 1)), bias 0.

    We deliberately differ from transformers' classifier init (N(0, initializer_range = 0.02)): on hidden states of norm
    ~sqrt(hidden_size) that gives initial values of std ~0.02 * sqrt(hidden_size) (~0.5 at 576, ~1.3 at 4096), noise
    as large as the rewards that the first advantages are built from; OpenRLHF's start is ~12-80x smaller. `only`:
    the head weights to initialise (those a checkpoint did not hold); None initialises the whole head.
    """
    head = {n: p for n, p in value_head_parameters(critic).items() if only is None or n in only}
    if not head:
        return
    # The head's input width is the width of the hidden states it reads (not always config.hidden_size: OPT-350m
    # projects 1024 -> 512); `ds_shape` is the full shape of a ZeRO-3 partition.
    shapes = [getattr(p, "ds_shape", p.shape) for p in value_head_parameters(critic).values()]
    hidden = next((s[-1] for s in shapes if len(s) == 2), None) or critic.config.get_text_config().hidden_size
    gathered = nullcontext()
    if is_zero3_partitioned(critic):  # the head only, not the whole critic
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(list(head.values()), modifier_rank=0)
    with gathered, torch.no_grad():
        if _is_rank_zero(critic):
            for name, param in head.items():
                if name.endswith("bias"):
                    param.zero_()
                else:
                    param.normal_(mean=0.0, std=1.0 / (hidden + 1))


# Names of the floats that models apply as dropout probabilities in training mode (`nn.functional.dropout(x, p=...)`):
# OPT's `dropout` / `attention_dropout` / `layerdrop`, Llama's `attention_dropout`, GPT-2's `*_pdrop` config fields.
_DROPOUT_WORDS = ("dropout", "pdrop", "layerdrop")


def _is_dropout_float(name: str, value) -> bool:
    return isinstance(value, float) and not isinstance(value, bool) and any(w in name for w in _DROPOUT_WORDS)


def dropout_settings(module: nn.Module) -> list[str]:
    """The names of `module`'s own dropout probabilities: `p` of an `nn.Dropout`, and float attributes named like a
    dropout probability (functional dropout, e.g. OPT's `self.dropout = config.dropout`)."""
    names = [name for name, value in vars(module).items() if _is_dropout_float(name, value)]
    if isinstance(module, nn.modules.dropout._DropoutNd):
        names.append("p")
    return names


def _config_dropout_fields(config) -> list[tuple[object, str]]:
    """(config, field) for every dropout-probability field of a transformers config and of its sub-configs."""
    from transformers import PretrainedConfig

    fields = []
    for name, value in vars(config).items():
        if _is_dropout_float(name, value):
            fields.append((config, name))
        elif isinstance(value, PretrainedConfig):
            fields.extend(_config_dropout_fields(value))
    return fields


def disable_dropout(model: nn.Module) -> None:
    """Every dropout of `model` off, also in training mode: TRL's `disable_dropout_in_model` (each `nn.Dropout` to
    p=0), plus the dropout that models configure by floats and apply functionally (OPT's `config.dropout`,
    `attention_dropout`, `layerdrop`), which TRL's leaves on: the module attributes read at forward time and the
    config fields (read by some models at forward time; a saved config then says 0 too). PPO's old log-probs and
    values must be the same function as the loss's, and the frozen passes of single-base mode run the policy's
    modules."""
    from transformers import PretrainedConfig
    from trl.trainer.utils import disable_dropout_in_model

    disable_dropout_in_model(model)
    configs = {}
    for module in model.modules():
        for name in dropout_settings(module):
            setattr(module, name, 0.0)
        config = getattr(module, "config", None)
        if isinstance(config, PretrainedConfig):
            configs[id(config)] = config
    for config in configs.values():
        for owner, name in _config_dropout_fields(config):
            setattr(owner, name, 0.0)


def has_active_dropout(settings: list[tuple[nn.Module, list[str]]], config=None, training: bool = False) -> bool:
    """True when a module in training mode holds a dropout probability > 0 (`settings`: modules and the names from
    `dropout_settings`), or, with `training`, a dropout field of `config` is > 0."""
    for module, names in settings:
        if module.training and any(getattr(module, name, 0.0) > 0 for name in names):
            return True
    if training and config is not None:
        return any(getattr(owner, name) > 0 for owner, name in _config_dropout_fields(config))
    return False


@contextmanager
def eval_mode(module: nn.Module):
    """`module.eval()` inside; every submodule's training flag restored on exit. The frozen passes (SFT, PT,
    reference) run this way: in single-base mode they run the policy's modules, which train."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, flag in flags:
            m.training = flag


VALUE_HEAD_NAMES = ("score", "classifier")


def value_head_linears(critic: nn.Module) -> list[nn.Linear]:
    """The linear layers of the critic's scalar head: the `score` / `classifier` modules (with PEFT's
    `modules_to_save` copies of them)."""
    heads = [m for name, m in critic.named_modules() if name.rsplit(".", 1)[-1] in VALUE_HEAD_NAMES]
    # Plain `nn.Linear` only: a quantized layer (a subclass) keeps its own forward.
    return list({id(m): m for head in heads for m in head.modules() if type(m) is nn.Linear}.values())


def _linear_in_own_dtype(self: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """`nn.Linear.forward` in the layer's own dtype, outside autocast (the hidden state is cast to the weight's
    dtype)."""
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        return nn.functional.linear(hidden.to(self.weight.dtype), self.weight, self.bias)


def keep_value_head_in_fp32(critic: nn.Module, upcast_weights: bool = True) -> None:
    """Run the critic's scalar head in fp32: its weights (with `upcast_weights`) and the hidden state it reads, also
    under bf16/fp16 autocast. The values are regressed on returns of ~10-20, and a bf16 head loses small updates:
    at the paper's critic lr (9e-6) an Adam step is below half a bf16 ulp once |w| > ~3e-3, so the head would stop
    learning. The head is one vector, so the fp32 copy costs nothing.

    `upcast_weights=False` (DeepSpeed, FSDP) leaves the weights to the engine, which keeps fp32 master weights (FSDP2
    also requires one dtype per trainable parameter group): the head then runs in the weights' dtype, still outside
    autocast.
    """
    for linear in value_head_linears(critic):
        if upcast_weights:
            linear.float()
        linear.forward = MethodType(_linear_in_own_dtype, linear)


def _gathered(module: nn.Module, modifier_rank: int | None = None):
    """DeepSpeed's `GatheredParameters` over a ZeRO-3-partitioned module's weights; a no-op for any other module."""
    return _gathered_params(list(module.parameters()), modifier_rank)


def _gathered_params(params: list, modifier_rank: int | None = None):
    """DeepSpeed's `GatheredParameters` over ZeRO-3-partitioned weights; a no-op when none is partitioned."""
    if not any(hasattr(p, "ds_id") for p in params):
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def _is_rank_zero(module: nn.Module) -> bool:
    """Where a gathered ZeRO-3 module may be modified (rank 0); always True when it is not partitioned."""
    if not is_zero3_partitioned(module) or not torch.distributed.is_initialized():
        return True
    return torch.distributed.get_rank() == 0


def _backbone_prefixes(model: nn.Module) -> tuple[str, ...]:
    prefix = getattr(model, "base_model_prefix", "model")
    return (prefix + ".",)


def reads_values_through_score(value_model: nn.Module) -> bool:
    """True for a one-label sequence classifier used as critic (TRL 1.12's): values come from `score` per token."""
    config = getattr(value_model, "config", None)
    prefix = getattr(value_model, "base_model_prefix", None)
    return (
        type(value_model).__name__.endswith("ForSequenceClassification")
        and getattr(config, "num_labels", None) == 1
        and isinstance(getattr(value_model, "score", None), nn.Module)
        and bool(prefix)
        and hasattr(value_model, prefix)
    )


def token_values(value_model: nn.Module, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
    """Per-token values [B, T, 1] of a token classifier, or of a sequence classifier read through its backbone."""
    if reads_values_through_score(value_model):
        backbone = getattr(value_model, value_model.base_model_prefix)
        hidden = backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        return value_model.score(hidden)
    return value_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits


def is_zero3_partitioned(module: nn.Module) -> bool:
    """True when DeepSpeed ZeRO-3 has partitioned the module's weights (loaded under `zero3_init_flag`): each process
    then holds a slice, and the module cannot run outside a DeepSpeed engine or a `GatheredParameters` context."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


def check_value_model(value_model: nn.Module) -> None:
    """Refuse, before training, a critic that does not return one value per token (`logits` of shape [B, T, 1])."""
    if is_zero3_partitioned(value_model):
        # No probe forward on partitioned weights (gathering a 7B critic on every GPU just to check it is not worth
        # it): its class and label count say the same.
        num_labels = getattr(getattr(value_model, "config", None), "num_labels", None)
        name = type(value_model).__name__
        if num_labels == 1 and (name.endswith("ForTokenClassification") or reads_values_through_score(value_model)):
            return
        raise ValueError(
            f"The value model must return one scalar per token, but it is a {name} with num_labels={num_labels}: use "
            "`AutoModelForTokenClassification.from_pretrained(sft_path, num_labels=1)` (or "
            "`AutoModelForSequenceClassification` with `num_labels=1`) or leave `value_model=None`."
        )
    device = next(value_model.parameters()).device
    probe = torch.tensor([[0, 0]], device=device)
    with torch.no_grad():
        try:
            logits = token_values(value_model, probe, torch.ones_like(probe))
        except Exception as exc:  # noqa: BLE001 - re-raised with the fix
            raise ValueError(
                f"The value model could not run on token ids ({exc}): pass a `*ForTokenClassification` or "
                "`*ForSequenceClassification` model with `num_labels=1`, or leave `value_model=None` to build one "
                "from the SFT model."
            ) from exc
    if logits is None or logits.shape[-1] != 1 or logits.dim() != 3:
        shape = None if logits is None else tuple(logits.shape)
        raise ValueError(
            f"The value model must return one scalar per token (`logits` of shape [B, T, 1]), got {shape}: use "
            "`AutoModelForTokenClassification.from_pretrained(sft_path, num_labels=1)` (or "
            "`AutoModelForSequenceClassification` with `num_labels=1`) or leave `value_model=None`."
        )


def is_kbit(model: nn.Module) -> bool:
    """True for a model loaded in 4 or 8 bits (bitsandbytes)."""
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def prepare_kbit(model: nn.Module, args) -> nn.Module:
    """PEFT's k-bit preparation (fp32 norms and head, input grads) for a 4/8-bit model; other models unchanged."""
    if not is_kbit(model):
        return model
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=bool(getattr(args, "activation_checkpointing", False))
    )


def critic_peft_config(peft_config):
    """The policy's PEFT config made fit for the critic: a token-classification task whose scalar head (`score` or
    `classifier`, new weights) trains in full next to the adapter."""
    import copy

    config = copy.deepcopy(peft_config)
    config.task_type = "TOKEN_CLS"
    config.modules_to_save = ["score", "classifier"]
    return config


def _checkpointing_on(module: nn.Module) -> bool:
    # transformers 5 renamed `is_gradient_checkpointing` (deprecated, warns) to `is_activation_checkpointing`; a PEFT
    # model answers for its base model through its `__getattr__`.
    on = getattr(module, "is_activation_checkpointing", None)
    return bool(getattr(module, "is_gradient_checkpointing", False) if on is None else on)


class PolicyAndValueWrapper(nn.Module):
    """Holds the policy and the critic so that one optimizer (and one DDP/DeepSpeed wrapper) trains both.

    `forward` runs both on the same query+response tokens; distributed wrappers need the call to go through it.
    """

    def __init__(self, policy: nn.Module, value_model: nn.Module):
        super().__init__()
        self.policy = policy
        self.value_model = value_model
        # Trainer reads these attributes from the model it trains.
        self.config = policy.config
        if hasattr(policy, "generation_config"):
            self.generation_config = policy.generation_config

    def forward(self, input_ids, attention_mask, logits_to_keep: int = 0):
        """Returns (policy logits [B, K, V] for the last K positions, or all with 0; values [B, T])."""
        position_ids = position_ids_from_attention_mask(attention_mask)
        logits = self.policy(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            logits_to_keep=logits_to_keep,
            use_cache=False,
        ).logits
        values = token_values(self.value_model, input_ids, attention_mask, position_ids)
        return logits, values.squeeze(-1)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, **kwargs):
        """Checkpoint the activations of the policy and of the critic (the Trainer calls this when it is on)."""
        for module in (self.policy, self.value_model):
            if hasattr(module, "activation_checkpointing_enable"):
                module.activation_checkpointing_enable(activation_checkpointing_kwargs, **kwargs)
            else:
                module.gradient_checkpointing_enable(gradient_checkpointing_kwargs=activation_checkpointing_kwargs)

    def activation_checkpointing_disable(self):
        for module in (self.policy, self.value_model):
            if hasattr(module, "activation_checkpointing_disable"):
                module.activation_checkpointing_disable()
            else:
                module.gradient_checkpointing_disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        """True when the policy or the critic checkpoints its activations (read by TRL's generation unwrapping)."""
        return any(_checkpointing_on(m) for m in (self.policy, self.value_model))

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs):
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_disable(self):
        self.activation_checkpointing_disable()
