"""The LM head's contiguous input (srppo_trl.models.contiguous_lm_head): the same logits, single-position (generation)
inputs left alone, hooks on the policy's, reward's and reference's heads during training and evaluation, none after.

Tiny models (srppo_trl.testing) in fp32.
"""

import pytest
import torch

from srppo_trl import CoherentRewardModel, SRPPOTrainer
from srppo_trl.models.contiguous_lm_head import contiguous_lm_head_input
from srppo_trl.testing import tiny_causal_lm, tiny_prompts, tiny_srppo_config, tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _ids(tokenizer, rows=3, length=12):
    torch.manual_seed(1)
    return torch.randint(3, len(tokenizer), (rows, length))


def _record_head_inputs(model, seen):
    return model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: seen.append((args[0].shape[-2], args[0].is_contiguous()))
    )


def test_lm_head_gets_a_contiguous_input_and_the_hook_is_removed(tokenizer):
    model = tiny_causal_lm(tokenizer, seed=3)
    ids = _ids(tokenizer)
    seen = []
    spy = _record_head_inputs(model, seen)
    expected = model(input_ids=ids, logits_to_keep=4).logits
    head = model.get_output_embeddings()
    with contiguous_lm_head_input([model, None, model]):
        assert len(head._forward_pre_hooks) == 1  # one hook, though the model is listed twice
        got = model(input_ids=ids, logits_to_keep=4).logits
        model(input_ids=ids, logits_to_keep=1)  # a generation step: left as transformers sliced it
    spy.remove()
    assert seen == [(4, False), (4, True), (1, False)]
    torch.testing.assert_close(got, expected)
    assert not head._forward_pre_hooks
    with pytest.raises(RuntimeError, match="boom"), contiguous_lm_head_input([model]):
        raise RuntimeError("boom")
    assert not head._forward_pre_hooks


def test_training_and_evaluation_feed_every_scoring_lm_head_a_contiguous_input(tokenizer, tmp_path):
    """The trainer hooks the policy's, the reward's SFT and PT and a separate reference model's heads, in training
    and in `evaluate`: every multi-position input they get is contiguous; no hook is left behind."""
    sft, pt, ref = (tiny_causal_lm(tokenizer, seed=s) for s in (1, 2, 4))
    trainer = SRPPOTrainer(
        args=tiny_srppo_config(tmp_path, max_steps=1),
        processing_class=tokenizer,
        model=tiny_causal_lm(tokenizer, seed=1),
        reward_model=CoherentRewardModel(sft, pt),
        ref_model=ref,
        train_dataset=tiny_prompts(),
    )
    policy = trainer.model.policy
    models = {"policy": policy, "sft": sft, "pt": pt, "ref": ref}
    seen = {name: [] for name in models}
    spies = [_record_head_inputs(model, seen[name]) for name, model in models.items()]
    trainer.train()
    trainer.evaluate(tiny_prompts(4))
    for spy in spies:
        spy.remove()
    for name, inputs in seen.items():
        scoring = [contiguous for positions, contiguous in inputs if positions > 1]
        assert scoring and all(scoring), name  # policy: the loss forward; the others: scoring
    for model in models.values():
        assert not model.get_output_embeddings()._forward_pre_hooks
