"""Phase 2 of a rollout buffer: score the sampled responses (`RolloutBuffer` in, `RolloutBuffer` out).

One forward of policy + critic (log-probs and values), one of the SFT model (serving both the KL reference and the
coherent reward when `ref_model` is the reward's SFT model), one of the pretrained model; or a sequence-classification
reward model read at the EOS token; or a Python reward function called as TRL's GRPO/RLOO call theirs. Then the
reward clip and the missing-EOS penalty. `ScoringMixin` is a part of `SRPPOTrainer`.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import torch
from torch import nn

from ..models.coherent_reward import CoherentRewardModel
from ..models.logprobs import gather_logprobs, position_ids_from_attention_mask, sequence_logprobs
from ..models.modeling import eval_mode
from . import ppo_math
from .rollout import RolloutBuffer


def _is_sequence_classifier(model: nn.Module) -> bool:
    return hasattr(model, "score") or hasattr(model, "classifier")


def _is_reward_function(reward_model) -> bool:
    """A Python reward callable in TRL's reward-function style (any callable that is not an `nn.Module`)."""
    return callable(reward_model) and not isinstance(reward_model, nn.Module)


class ScoringMixin:
    """`SRPPOTrainer`'s scoring methods (phase 2); they read `self.args`, `self.model`, `self.reward_model`,
    `self.ref_model` and `self.processing_class`."""

    # ------------------------------------------------------------------ phase 2: score

    def _policy_and_values(self, model, query, query_mask, response, response_mask, with_entropy: bool = False):
        """One forward of policy and critic: (log-probs of the response tokens [B, R], values [B, R]), plus with
        `with_entropy` the entropy of the policy's sampling distribution at each response position [B, R] (detached)."""
        input_ids = torch.cat([query, response], dim=1)
        attention_mask = torch.cat([query_mask, response_mask], dim=1)
        width, context = response.shape[1], query.shape[1]
        logits, values = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=width + 1)
        logprobs = gather_logprobs(logits[:, :-1], response, self.args.temperature)
        values = values[:, context - 1 : -1].float()
        if not with_entropy:
            return logprobs, values
        with torch.no_grad():
            shifted = logits[:, :-1].detach()
            entropy = ppo_math.entropy_from_logits(
                shifted if self.args.temperature == 1.0 else shifted / self.args.temperature
            )
        return logprobs, values, entropy

    @torch.no_grad()
    def score_rollouts(self, rollouts: RolloutBuffer) -> RolloutBuffer:
        """Policy log-probs, critic values, reference log-probs and the reward of each rollout.

        Returns the buffer with its phase-2 fields set: `logprobs`, `values`, `ref_logprobs`, `token_scores`,
        `eos_penalty`, `scores` (the sequence reward, after `reward_clip` and `missing_eos_penalty`) and, with the
        coherent reward, `coherent_reward`. With a coherent reward and `ref_model` its SFT model, the SFT log-probs
        are computed once and serve both the KL reference and the reward.

        When `rollouts.first_forward` holds the first rows' policy and critic forward (the loss forward of the
        buffer's first micro-batch, see `SRPPOTrainer.make_rollout_buffer`), those rows take their log-probs and
        values from it and skip the policy and critic pass.
        """
        chunk = self.args.local_rollout_forward_batch_size
        first = rollouts.first_forward
        done = 0 if first is None else len(first[0])
        parts = defaultdict(list)
        for start in range(0, len(rollouts.query), chunk):
            piece = rollouts.select(slice(start, start + chunk))
            known = None
            if start < done:  # the chunk's first rows already have their policy outputs
                known = tuple(t[start : min(start + chunk, done)].detach() for t in first[:2])
            # Every pass in the autocast of the trained ones (accelerate's, with bf16/fp16: the prepared model's
            # forward runs in it), the frozen SFT/PT/reference passes included: in one precision the KL to the SFT
            # model is exactly 0 at the start, and the SFT pass of single-base mode is the policy's own computation.
            # Log-softmax, rewards and advantages stay fp32.
            with self.accelerator.autocast():
                scored = self._score_chunk(piece, known)
            for key, value in scored.items():
                parts[key].append(value)
        return dataclasses.replace(rollouts, **{k: torch.cat(v) for k, v in parts.items()})

    def _score_chunk(self, piece: RolloutBuffer, known: tuple | None = None) -> dict:
        """The phase-2 fields of a chunk of rollouts, as a dict of field name -> tensor. `known`: (log-probs, values)
        of its first rows, already computed."""
        query, query_mask = piece.query, piece.query_mask
        response, response_mask = piece.response, piece.response_mask
        context = query.shape[1]
        input_ids = torch.cat([query, response], dim=1)
        attention_mask = torch.cat([query_mask, response_mask], dim=1)
        full_response_mask = torch.cat([torch.zeros_like(query_mask), response_mask], dim=1)

        # Policy and critic, except for the first rows whose outputs are `known`.
        skip = 0 if known is None else len(known[0])
        logprobs, values = known if known is not None else (None, None)
        if skip < len(query):
            rest = self._policy_and_values(
                self.model, query[skip:], query_mask[skip:], response[skip:], response_mask[skip:]
            )
            if known is None:
                logprobs, values = rest
            else:
                logprobs, values = (torch.cat([a, b]) for a, b in zip(known, rest))
        mask = response_mask.float()
        out = {"logprobs": logprobs * mask, "values": values * mask}

        token_scores = None
        if isinstance(self.reward_model, CoherentRewardModel):
            sft = self.reward_model.sft_log_probs(input_ids, attention_mask, full_response_mask)[:, context:]
            base = self.reward_model.base_log_probs(input_ids, attention_mask, full_response_mask)[:, context:]
            token_scores = sft - base
            scores = token_scores.sum(-1)
            out["coherent_reward"] = scores.clone()
        elif _is_reward_function(self.reward_model):
            scores = self._reward_function_scores(query, query_mask, response, response_mask)
            sft = None
        else:
            scores = self._sequence_classifier_scores(input_ids, attention_mask, full_response_mask)
            sft = None

        if self.ref_is_reward_sft and self.args.temperature == 1.0 and sft is not None:
            ref_logprobs = sft  # one SFT forward serves the KL and the reward
        else:
            ref_logprobs = self._reference_logprobs(input_ids, attention_mask, full_response_mask)[:, context:]
        out["ref_logprobs"] = ref_logprobs * mask

        clip = self.args.reward_clip
        token_level = self.args.reward_granularity == "token" and token_scores is not None
        if token_level:
            # Appendix E: every token's reward is clipped on its own; the sequence score is their sum.
            token_scores = token_scores * mask
            if clip is not None:
                token_scores = token_scores.clamp(-clip, clip) * mask
            scores = token_scores.sum(-1)
        elif clip is not None:
            scores = scores.clamp(-clip, clip)
        eos_penalty = torch.zeros_like(scores)
        if self.args.missing_eos_penalty is not None and self.args.stop_token_id is not None:
            eos_penalty = torch.where(piece.has_stop, eos_penalty, eos_penalty - self.args.missing_eos_penalty)
        out["eos_penalty"] = eos_penalty  # [B], lands on the last token alone
        out["scores"] = scores + eos_penalty
        out["token_scores"] = token_scores * mask if token_level else torch.zeros_like(logprobs)
        return out

    def _reference_logprobs(self, input_ids, attention_mask, response_mask) -> torch.Tensor:
        """The KL reference's log-probs, in eval mode (the policy with its adapter disabled trains otherwise)."""
        temperature = self.args.temperature
        if self.ref_is_reward_sft:
            with self.reward_model.sft_context() as sft_model, eval_mode(sft_model):
                return sequence_logprobs(sft_model, input_ids, attention_mask, response_mask, temperature)
        if self.ref_model is None:
            policy = self.accelerator.unwrap_model(self.model).policy
            with self.null_ref_context(), eval_mode(policy):
                return sequence_logprobs(policy, input_ids, attention_mask, response_mask, temperature)
        with eval_mode(self.ref_model):
            return sequence_logprobs(self.ref_model, input_ids, attention_mask, response_mask, temperature)

    def _reward_function_scores(self, query, query_mask, response, response_mask) -> torch.Tensor:
        """Scores [B] from a reward function called as TRL's GRPO/RLOO trainers call theirs.

        `prompts`: the prompt text as the policy saw it (chat template applied, special tokens kept, padding removed);
        `completions`: the response text up to the stop token, special tokens skipped; `completion_ids`: the response
        token ids up to and including the stop token; plus `trainer_state`. `None` scores (TRL's "not applicable")
        count as 0.
        """
        tokenizer = self.processing_class
        prompts, completions, completion_ids = [], [], []
        for q, qm, r, rm in zip(query, query_mask, response, response_mask):
            ids = r[rm.bool()].tolist()
            prompts.append(tokenizer.decode(q[qm.bool()], skip_special_tokens=False))
            completions.append(tokenizer.decode(ids, skip_special_tokens=True))
            completion_ids.append(ids)
        scores = self.reward_model(
            prompts=prompts, completions=completions, completion_ids=completion_ids, trainer_state=self.state
        )
        if len(scores) != len(prompts):
            raise ValueError(f"The reward function returned {len(scores)} scores for {len(prompts)} completions.")
        scores = [0.0 if s is None else float(s) for s in scores]
        return torch.tensor(scores, dtype=torch.float32, device=response.device)

    def _sequence_classifier_scores(self, input_ids, attention_mask, response_mask) -> torch.Tensor:
        """Score of a one-label sequence classifier read at the last response token (its EOS), as TRL's PPO did.

        The backbone's hidden states go through the classifier head at that index, so padding (even a pad token equal
        to EOS) never decides where the score is read.
        """
        model = self.reward_model
        backbone = getattr(model, model.base_model_prefix)
        hidden = backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_attention_mask(attention_mask),
            use_cache=False,
        ).last_hidden_state
        last = ppo_math.last_token_index(response_mask).clamp(min=0)
        picked = hidden[torch.arange(len(hidden), device=hidden.device), last]
        head = model.score if hasattr(model, "score") else model.classifier
        return head(picked).squeeze(-1).float()
