"""The coherent reward of SRPPO (arXiv 2510.21090, eq. 3).

    r~(x, y) = log p_SFT(y | x) - log p_PT(y | x) = sum_j [log p_SFT(y_j | x, y_<j) - log p_PT(y_j | x, y_<j)]

Both log-probabilities are of the same token sequence, at temperature 1, under the same tokenizer. The module knows
nothing about PPO: it scores token sequences. Where the reward is placed (at EOS, or per token) is the trainer's job.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .logprobs import sequence_logprobs
from .modeling import eval_mode


def _is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency, but the reward must not need it
        return False
    return isinstance(model, PeftModel)


def vocab_size(model: nn.Module) -> int:
    """The number of rows of `model`'s output embeddings (the logits' width), also under ZeRO-3 partitioning."""
    embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        # A weight partitioned by DeepSpeed ZeRO-3 (`zero3_init_flag`) is empty here; its full shape is `ds_shape`.
        return int(getattr(embeddings.weight, "ds_shape", embeddings.weight.shape)[0])
    return int(model.config.vocab_size)


def check_same_vocabulary(sft_model: nn.Module, base_model: nn.Module) -> None:
    """Raise `ValueError` when two causal LMs cannot score the same token ids."""
    sft_vocab, base_vocab = vocab_size(sft_model), vocab_size(base_model)
    if sft_vocab != base_vocab:
        raise ValueError(
            f"The SFT model has a vocabulary of {sft_vocab} tokens but the pretrained model has {base_vocab}: the "
            "coherent reward needs both to score the same token ids, so use an SFT model fine-tuned from this very "
            "base model with the same tokenizer (if SFT added tokens, call `base_model.resize_token_embeddings` "
            "to match)."
        )


def check_same_tokenizer(sft_tokenizer, base_tokenizer) -> None:
    """Raise `ValueError` when two tokenizers map text to different ids (the coherent reward would be meaningless)."""
    if sft_tokenizer.get_vocab() != base_tokenizer.get_vocab():
        raise ValueError(
            "The SFT and pretrained tokenizers have different vocabularies: the coherent reward compares the two "
            "models on the same token ids, so load both with the tokenizer of the base model the SFT model was "
            "trained from."
        )


class CoherentRewardModel(nn.Module):
    """Scores a response by `log p_SFT(y|x) - log p_PT(y|x)` with two frozen causal LMs.

    Args:
        sft_model: the supervised fine-tuned causal LM (`p_SFT`). It may be a PEFT model holding the SFT adapter.
        base_model: the pretrained causal LM the SFT model was trained from (`p_PT`). Leave it `None` for
            *single-base mode*: `sft_model` must then be a PEFT model, and `p_PT` is the same model with its
            adapters disabled, so only one copy of the base weights is held.
        sft_adapter_name: in single-base mode, the name of the SFT adapter when the PEFT model holds several
            (e.g. the policy's adapter too); that adapter is activated for `p_SFT` and only its weights are frozen.

    Inputs of every method: `input_ids`, `attention_mask` and `response_mask`, all [B, T]. `response_mask` is 1 on the
    response tokens (EOS included) and 0 on the prompt and padding. Prompts may be left-padded: positions follow the
    attention mask, so padding does not change the reward.
    """

    def __init__(
        self,
        sft_model: nn.Module,
        base_model: nn.Module | None = None,
        sft_adapter_name: str | None = None,
    ):
        super().__init__()
        if base_model is None and not _is_peft_model(sft_model):
            raise ValueError(
                "No `base_model` was given and `sft_model` is not a PEFT model: pass the pretrained model as "
                "`base_model`, or an SFT model made of the base model plus a PEFT adapter (single-base mode)."
            )
        if base_model is not None:
            check_same_vocabulary(sft_model, base_model)
        self.sft_model = sft_model
        self.base_model = base_model
        self.sft_adapter_name = sft_adapter_name
        self._freeze()

    @property
    def single_base(self) -> bool:
        """True when `p_PT` is `sft_model` with its adapters disabled."""
        return self.base_model is None

    def _freeze(self) -> None:
        if self.single_base and self.sft_adapter_name is not None:
            # The PEFT model may also hold adapters that other roles train: freeze only the SFT adapter (PEFT keeps
            # the base weights frozen itself).
            marker = f".{self.sft_adapter_name}."
            for name, param in self.sft_model.named_parameters():
                if marker in name:
                    param.requires_grad_(False)
        else:
            self.sft_model.requires_grad_(False)
            self.sft_model.eval()
        if self.base_model is not None:
            self.base_model.requires_grad_(False)
            self.base_model.eval()

    def train(self, mode: bool = True):
        # The reward is frozen: it stays in eval mode (no dropout) whatever the trainer asks of its parent module.
        return super().train(False)

    @contextmanager
    def sft_context(self):
        """Context manager yielding the model that computes `p_SFT` (activates the SFT adapter in single-base mode)."""
        if self.single_base and self.sft_adapter_name is not None:
            from trl.trainer.utils import use_adapter

            with use_adapter(self.sft_model, self.sft_adapter_name):
                yield self.sft_model
        else:
            yield self.sft_model

    @contextmanager
    def base_context(self):
        """Context manager yielding the model that computes `p_PT` (adapters disabled in single-base mode)."""
        if self.single_base:
            with self.sft_model.disable_adapter():
                yield self.sft_model
        else:
            yield self.base_model

    @torch.no_grad()
    def sft_log_probs(self, input_ids, attention_mask, response_mask) -> torch.Tensor:
        """`log p_SFT(y_t | x, y_<t)` at each response token, fp32 [B, T], 0 elsewhere. Runs in eval mode (in
        single-base mode the SFT model is the policy's modules, which may be training)."""
        with self.sft_context() as model, eval_mode(model):
            return sequence_logprobs(model, input_ids, attention_mask, response_mask)

    @torch.no_grad()
    def base_log_probs(self, input_ids, attention_mask, response_mask) -> torch.Tensor:
        """`log p_PT(y_t | x, y_<t)` at each response token, fp32 [B, T], 0 elsewhere. Runs in eval mode."""
        with self.base_context() as model, eval_mode(model):
            return sequence_logprobs(model, input_ids, attention_mask, response_mask)

    def token_log_ratios(self, input_ids, attention_mask, response_mask) -> torch.Tensor:
        """Per-token coherent reward `log p_SFT(y_t|...) - log p_PT(y_t|...)`, fp32 [B, T], 0 outside the response."""
        return self.sft_log_probs(input_ids, attention_mask, response_mask) - self.base_log_probs(
            input_ids, attention_mask, response_mask
        )

    def forward(self, input_ids, attention_mask, response_mask) -> torch.Tensor:
        """Sequence-level coherent reward `r~(x, y)`: the sum of `token_log_ratios` over the response, fp32 [B]."""
        return self.token_log_ratios(input_ids, attention_mask, response_mask).sum(-1)
