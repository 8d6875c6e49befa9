"""The lower decoder layers that the SFT model and a top-layer critic share, run once per rollout row.

With `build_single_base(..., critic_top_layers=k)` the critic is the SFT model plus a trainable "critic" LoRA adapter on
its top `k` decoder layers only ("sft" and "critic" both active). Below layer `L - k` the critic IS the frozen SFT
model: for the same tokens, the hidden state entering layer `L - k` is the same tensor in the SFT scoring pass (the
reward and the KL reference) and in every critic pass of the buffer. [`SharedLowerLayers`] computes it once per row
and lets the later passes run only the top `k` layers:

- while installed (`with shared.installed():`), every forward of the shared backbone whose lower layers run exactly
  the "sft" adapter (no other adapter active there, none merged, no active dropout) is *eligible*;
- an eligible forward whose rows (input ids, attention mask, position ids and the autocast state, compared exactly) are
  all cached runs its lower layers as stubs that return the cached hidden state (the embedding, rotary and mask code
  still run);
- any other eligible forward runs in full and stores the hidden state leaving layer `L - k - 1` for its rows.

A partial hit runs in full (no mixing within a batch). The cache holds `[T, H]` per row in the model's dtype until
`clear()` (the trainer clears it at every new rollout buffer and after each evaluation batch). The lower layers are
frozen and the key is the exact input, so a hit returns what the stubbed layers would have computed, up to the float
rounding of a different batch composition. Unsupported cases fall back to running every layer: decoder layers that
return a tuple (older transformers), `output_hidden_states` / `output_attentions`, `inputs_embeds`, a KV cache.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .modeling import dropout_settings, has_active_dropout


def decoder_layers(backbone: nn.Module, num_layers: int) -> nn.ModuleList:
    """The backbone's list of decoder layers: its `nn.ModuleList` child of `num_layers` modules."""
    for module in backbone.modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return module
    raise ValueError(
        f"Could not find the {num_layers} decoder layers of {type(backbone).__name__} (an nn.ModuleList of that "
        "length): critic_top_layers needs a backbone that holds its layers in one list."
    )


def _autocast_tag(device_type: str) -> bytes:
    """The autocast state of `device_type` as part of a cache key: a row computed under bf16 autocast is not the row
    an fp32 pass would compute."""
    if not torch.is_autocast_enabled(device_type):
        return b"-"
    return str(torch.get_autocast_dtype(device_type)).encode()


class SharedLowerLayers:
    """Caches the hidden state entering decoder layer `split` of `backbone`, per row, for passes whose lower layers
    run exactly `adapter_name` (see the module docstring)."""

    def __init__(self, backbone: nn.Module, layers: nn.ModuleList, split: int, adapter_name: str):
        if not 0 < split < len(layers):
            raise ValueError(f"split must be in [1, {len(layers) - 1}], got {split}.")
        self.backbone = backbone
        self.lower = list(layers[:split])
        self.split = split
        self.adapter_name = adapter_name
        from peft.tuners.lora import LoraLayer

        self._lora_layers = [m for layer in self.lower for m in layer.modules() if isinstance(m, LoraLayer)]
        # Every dropout below the critic's layers, `nn.Dropout` or a float applied functionally (OPT's `dropout`),
        # with the backbone's own (embedding dropout, `layerdrop`): the cached rows must be what those layers compute.
        top = {id(m) for layer in layers[split:] for m in layer.modules()}
        settings = ((m, dropout_settings(m)) for m in backbone.modules() if id(m) not in top)
        self._dropouts = [(m, names) for m, names in settings if names]
        self._rows: dict[bytes, torch.Tensor] = {}
        self._unsupported = False  # a decoder layer returned something other than a tensor
        self.hits = 0  # forwards that ran only the top layers (for tests and benchmarks)
        self.misses = 0  # eligible forwards that ran every layer and filled the cache

    def clear(self) -> None:
        self._rows.clear()

    def __len__(self) -> int:
        return len(self._rows)

    # ------------------------------------------------------------------ eligibility and keys

    def _lower_layers_run_only_the_adapter(self) -> bool:
        for module in self._lora_layers:
            if module.disable_adapters or module.merged:
                return False
            present = [name for name in module.active_adapters if name in module.lora_A]
            if present != [self.adapter_name]:
                return False
            dropout = module.lora_dropout[self.adapter_name]
            if dropout.training and getattr(dropout, "p", 0.0) > 0:
                return False
        if not self._lora_layers:
            return False
        config = getattr(self.backbone, "config", None)
        return not has_active_dropout(self._dropouts, config, training=self.backbone.training)

    def _keys(self, kwargs: dict) -> list[bytes] | None:
        if self._unsupported or kwargs.get("inputs_embeds") is not None:
            return None
        if kwargs.get("use_cache") or kwargs.get("past_key_values") is not None:
            return None
        if kwargs.get("output_hidden_states") or kwargs.get("output_attentions"):
            return None
        input_ids = kwargs.get("input_ids")
        mask = kwargs.get("attention_mask")
        if input_ids is None or input_ids.dim() != 2 or (mask is not None and mask.shape != input_ids.shape):
            return None
        if not self._lower_layers_run_only_the_adapter():
            return None
        parts = [input_ids.long()]
        parts.append(mask.long() if mask is not None else torch.full_like(input_ids, -1, dtype=torch.long))
        positions = kwargs.get("position_ids")
        if positions is not None:
            if positions.shape != input_ids.shape:
                return None
            parts.append(positions.long())
        rows = torch.cat(parts, dim=1).cpu().numpy()
        tag = (b"p" if positions is not None else b"n") + _autocast_tag(input_ids.device.type)
        return [tag + row.tobytes() for row in rows]

    # ------------------------------------------------------------------ installation

    @contextmanager
    def installed(self):
        """Route the backbone's forwards through the cache while inside; everything is restored on exit."""
        backbone = self.backbone
        had_own_forward = "forward" in backbone.__dict__
        original = backbone.forward
        state = {"store": None}

        def capture(module, args, output):
            keys = state["store"]
            if keys is None:
                return
            if not isinstance(output, torch.Tensor):
                self._unsupported = True
                return
            hidden = output.detach().clone()  # the next layer must not be able to change the cached rows
            for key, row in zip(keys, hidden):
                self._rows.setdefault(key, row)

        def forward(*args, **kwargs):
            keys = self._keys(kwargs) if not args else None
            if keys is None:
                return original(*args, **kwargs)
            if all(key in self._rows for key in keys):
                cached = torch.stack([self._rows[key] for key in keys])
                self.hits += 1
                return self._run_top_layers(original, cached, kwargs)
            self.misses += 1
            state["store"] = keys
            try:
                return original(*args, **kwargs)
            finally:
                state["store"] = None

        handle = self.lower[-1].register_forward_hook(capture)
        backbone.forward = forward
        try:
            yield self
        finally:
            handle.remove()
            if had_own_forward:
                backbone.forward = original
            else:
                del backbone.forward

    def _run_top_layers(self, original, cached: torch.Tensor, kwargs: dict):
        """One forward of the backbone with the lower layers replaced by stubs returning `cached`."""

        def stub(*args, **kwargs):
            return cached

        previous = [layer.__dict__.get("forward") for layer in self.lower]
        for layer in self.lower:
            layer.forward = stub
        try:
            return original(**kwargs)
        finally:
            for layer, own in zip(self.lower, previous):
                if own is None:
                    del layer.forward
                else:
                    layer.forward = own


__all__ = ["SharedLowerLayers", "decoder_layers"]
