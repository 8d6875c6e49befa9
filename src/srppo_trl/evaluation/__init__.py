"""Evaluation: the offline IFEval-style benchmark and arithmetic task (CPU, no network),

    from srppo_trl.evaluation import evaluate_offline
    metrics = evaluate_offline(model, tokenizer, n_per_split=40, seed=0)

plus the paper's benchmarks through lm-evaluation-harness (`evaluate_model`, for GPU users) and the reward
diagnostics (`run_reward_diagnostics`, `compute_diagnostics`, `RewardDiagnosticsCallback`; CPU or GPU).

Names load lazily, so importing the package does not import lm-eval.
"""

from importlib import import_module


_LAZY = {
    "IN_DOMAIN": "srppo_trl.evaluation.instructions",
    "HELD_OUT": "srppo_trl.evaluation.instructions",
    "EXCLUDED": "srppo_trl.evaluation.instructions",
    "build_instruction_prompts": "srppo_trl.evaluation.instructions",
    "make_instruction_example": "srppo_trl.evaluation.instructions",
    "score_instruction_responses": "srppo_trl.evaluation.instructions",
    "build_arithmetic_problems": "srppo_trl.evaluation.arithmetic",
    "extract_answer": "srppo_trl.evaluation.arithmetic",
    "score_arithmetic": "srppo_trl.evaluation.arithmetic",
    "generate_responses": "srppo_trl.evaluation.generation",
    "evaluate_offline": "srppo_trl.evaluation.offline",
    "ensure_punkt_tab": "srppo_trl.evaluation.punkt_data",
    "evaluate_model": "srppo_trl.evaluation.lm_eval_wrapper",
    "encode_prompt_response": "srppo_trl.evaluation.reward_diagnostics",
    "compute_diagnostics": "srppo_trl.evaluation.reward_diagnostics",
    "run_reward_diagnostics": "srppo_trl.evaluation.reward_diagnostics",
    "RewardDiagnosticsCallback": "srppo_trl.evaluation.reward_diagnostics",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'srppo_trl.evaluation' has no attribute {name!r}")
