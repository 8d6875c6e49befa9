"""How a rollout draws each token from the policy's distribution: inverse transform sampling, inside `generate`.

`transformers` samples with `torch.multinomial(probs, 1)`, which draws one exponential variate per vocabulary entry
and row at every step (it takes `argmax(p / q)`, q ~ Exp(1)): 49,152 draws per row and token for SmolLM2, 7% of a
bf16 rollout on a CPU with AMX (docs/benchmarks.md). Inverse transform sampling draws one uniform number per row
instead: with `c` the cumulative sum of the probabilities, the token is the first index `i` with `c[i] > u * c[-1]`. Both draw exactly from
`softmax(scores)`; they consume the random stream differently, so the same seed gives other (equally distributed)
responses. `SRPPOConfig.rollout_sampler="multinomial"` keeps transformers' own sampler.

The draw runs inside `generate`, as its last logits processor, with `do_sample=False`: the processor returns scores that
are `-inf` everywhere but at the drawn token, so the greedy step picks it. Everything else stays transformers'
(the KV cache, stopping, padding of finished rows, every model and PEFT wrapper). Greedy decoding applies no
sampling warpers, so the processors before it are transformers' own temperature, top-k and top-p warpers, in
transformers' order; a config asking for another one (`min_p`, `typical_p`, ...) is refused.

The cumulative sum is taken in float64: in float32 its rounding (~1e-7 of the total, over 50k terms) would be of the
order of a rare token's probability.
"""

from __future__ import annotations

import copy

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper


ROLLOUT_SAMPLERS = ("inverse_cdf", "multinomial")

# Fields the inverse-CDF path cannot honour, with the values that turn each off. Sampling warpers transformers applies
# only with `do_sample=True` (temperature, top-k and top-p are re-created; any other one set is refused rather than
# silently dropped), and fields that would change the decoding mode of the greedy copy (contrastive search, assisted
# decoding, several sequences per prompt) or add a processor after the sampler (watermarking).
_REFUSED_UNLESS_OFF = {
    "top_h": (None,),
    "min_p": (None,),
    "typical_p": (None, 1.0),
    "epsilon_cutoff": (None, 0.0),
    "eta_cutoff": (None, 0.0),
    "penalty_alpha": (None, 0.0),
    "num_return_sequences": (None, 1),
    "prompt_lookup_num_tokens": (None,),
    "assistant_early_exit": (None,),
    "watermarking_config": (None,),
}


def inverse_cdf_sample(weights: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """The index drawn by inverse transform sampling from each row of `weights` (B, V), non-negative, not necessarily
    normalised: the first `i` whose cumulative sum exceeds `uniform` (B,) in [0, 1) times the row's total. A token of
    weight 0 is never drawn. Returns (B,) int64."""
    return _index_in_cdf(weights.cumsum(-1, dtype=torch.float64), uniform)


def _index_in_cdf(cdf: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    threshold = uniform.to(torch.float64).unsqueeze(-1) * cdf[:, -1:]
    # `right=True`: the first entry strictly above the threshold (an entry equal to it, e.g. 0 after zero-weight
    # tokens, is passed over). Clamped for a threshold rounded up to the total itself.
    index = torch.searchsorted(cdf, threshold, right=True).squeeze(-1)
    return index.clamp_(max=cdf.shape[-1] - 1)


class InverseCDFSampler(LogitsProcessor):
    """The last logits processor of a greedy `generate`: draws the next token from `softmax(scores)` (the scores after
    the warpers before it) by `inverse_cdf_sample`, with the default random generator of the scores' device, and
    returns scores whose argmax is the drawn token (0 there, `-inf` elsewhere).

    `record_logprobs=True` keeps, per step, the log-probability of each drawn token under `softmax(scores)`
    (`self.logprobs`, a list of (B,) tensors), since the scores `generate` returns are the one-hot ones."""

    def __init__(self, record_logprobs: bool = False):
        self.record_logprobs = record_logprobs
        self.logprobs: list[torch.Tensor] = []
        self._cdf: torch.Tensor | None = None  # reused at every step: a fresh (B, V) float64 tensor costs page faults

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.float()
        if self._cdf is None or self._cdf.shape != scores.shape or self._cdf.device != scores.device:
            self._cdf = torch.empty(scores.shape, dtype=torch.float64, device=scores.device)
        cdf = self._cdf.copy_(torch.softmax(scores, dim=-1)).cumsum_(-1)  # NaN in a row (or all -inf) -> NaN total
        total = cdf[:, -1]
        valid = torch.isfinite(total) & (total > 0)
        if scores.device.type == "cpu":
            if not bool(valid.all()):
                raise ValueError(
                    "The policy's next-token scores contain NaN or are all -inf in some row, so no token can be "
                    "sampled: check the model's weights and inputs for NaN (a diverged update, an fp16 overflow)."
                )
        else:  # no host synchronisation at every step on an accelerator; the device raises asynchronously
            torch._assert_async(valid.all(), "rollout sampling: NaN or all -inf next-token scores")
        uniform = torch.rand(scores.shape[0], device=scores.device, dtype=torch.float64)
        token = _index_in_cdf(cdf, uniform).unsqueeze(-1)
        if self.record_logprobs:
            self.logprobs.append(torch.log_softmax(scores, dim=-1).gather(-1, token).squeeze(-1))
        return torch.full_like(scores, -torch.inf).scatter_(-1, token, 0.0)


def inverse_cdf_generation(
    generation_config: GenerationConfig, record_logprobs: bool = False
) -> tuple[GenerationConfig, LogitsProcessorList, InverseCDFSampler]:
    """The greedy copy of a sampling `generation_config` and the logits processors that make `generate` sample from
    the same distribution with `InverseCDFSampler`: transformers' temperature, top-k and top-p warpers (as
    `_get_logits_processor` builds them for sampling with one beam), then the sampler. Pass both to `generate`."""
    if not generation_config.do_sample or (generation_config.num_beams or 1) > 1:
        raise ValueError(
            "Inverse-CDF rollout sampling needs a sampling config with one beam (do_sample=True, num_beams=1); "
            "use rollout_sampler='multinomial' for other decoding modes."
        )
    for name, off in _REFUSED_UNLESS_OFF.items():
        if getattr(generation_config, name, None) not in off:
            raise ValueError(
                f"Inverse-CDF rollout sampling supports temperature, top_k and top_p, not {name}="
                f"{getattr(generation_config, name)}: set rollout_sampler='multinomial' to sample with it."
            )
    temperature, top_k, top_p = generation_config.temperature, generation_config.top_k, generation_config.top_p
    if top_k is None:  # transformers would fill in its default, 50
        raise ValueError(
            "Inverse-CDF rollout sampling needs top_k set explicitly (0 turns it off): None means transformers' "
            "default top_k=50. `rollout_generation_config` sets every sampling field."
        )
    processors = LogitsProcessorList()
    if temperature is not None and temperature != 1.0:
        processors.append(TemperatureLogitsWarper(temperature))
    if top_k is not None and top_k != 0:
        processors.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
    if top_p is not None and top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
    sampler = InverseCDFSampler(record_logprobs=record_logprobs)
    processors.append(sampler)
    greedy = copy.deepcopy(generation_config)
    # Greedy decoding; the sampling fields at their neutral values (transformers warns about sampling fields set in
    # a greedy config; the warpers above carry them).
    greedy.do_sample, greedy.temperature, greedy.top_k, greedy.top_p = False, 1.0, None, 1.0
    # Token ids only: the scores `generate` would return are the one-hot ones (the sampler records log-probs itself).
    greedy.return_dict_in_generate = greedy.output_scores = greedy.output_logits = False
    return greedy, processors, sampler


__all__ = ["ROLLOUT_SAMPLERS", "InverseCDFSampler", "inverse_cdf_generation", "inverse_cdf_sample"]
