"""Prompt tokenization shared by SFT, rollouts and both reward passes: the same, correct prefix everywhere.

Base models such as Llama-3 and Mistral were pretrained on sequences that start with BOS, and their tokenizers add it
to plain text. A chat template rendered with `apply_chat_template` adds no special tokens of its own, so a template
without `{{ bos_token }}` (TULU's, which we set for base models, or a user's) silently drops the BOS: p_PT then scores
text off its training distribution, and the SFT model learns on a prefix the rollouts may not have. Both helpers here
put the BOS back exactly where the tokenizer itself would, and nowhere else.
"""

from __future__ import annotations

import logging


logger = logging.getLogger(__name__)


def bos_token_added_to_text(tokenizer) -> int | None:
    """The BOS id that `tokenizer` puts in front of plain text (`add_special_tokens=True`), or None if it adds none."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if ids and ids[0] == bos else None


def ensure_chat_template_bos(tokenizer) -> bool:
    """Prefix the chat template with `{{ bos_token }}` when the tokenizer adds a BOS to text but the template does not
    render one. Returns True when the template was changed. SFT (TRL's `SFTTrainer` tokenizes through the template)
    and the rollouts then see the same BOS-led prefix."""
    bos = bos_token_added_to_text(tokenizer)
    if bos is None or tokenizer.chat_template is None:
        return False
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "a"}], tokenize=False, add_generation_prompt=True
    )
    if rendered.startswith(tokenizer.bos_token):
        return False
    tokenizer.chat_template = "{{ bos_token }}" + tokenizer.chat_template
    return True


def tokenize_prompt(tokenizer, prompt) -> list[int]:
    """Token ids of one prompt as the policy sees it: plain text with the tokenizer's special tokens, or chat messages
    through the chat template (with the generation prompt), led by the tokenizer's BOS when it adds one to text."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    ids = list(
        tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    )
    bos = bos_token_added_to_text(tokenizer)
    if bos is not None and ids[:1] != [bos]:
        ids = [bos, *ids]
    return ids


__all__ = ["bos_token_added_to_text", "ensure_chat_template_bos", "tokenize_prompt"]
