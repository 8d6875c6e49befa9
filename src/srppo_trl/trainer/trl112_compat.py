"""TRL 1.12 `PPOTrainer`'s own API on `SRPPOTrainer`: `null_ref_context`, `generate_completions` (the sample table
every `num_sample_generations` updates), the `episode`/`eps` metrics. See docs/migrating_from_trl_ppo.md.
"""

from __future__ import annotations

import copy
import math
import time
from collections import defaultdict
from contextlib import contextmanager

import torch
from transformers import TrainerCallback


class TRL112CompatMixin:
    """`SRPPOTrainer`'s methods that TRL 1.12 `PPOTrainer` users call."""

    # ------------------------------------------------------------------ TRL 1.12 PPOTrainer's API

    @contextmanager
    def null_ref_context(self):
        """The policy as KL reference: with `ref_adapter_name` that adapter active, else its adapters disabled; the
        active adapter is restored afterwards (TRL's `use_adapter`).

        Only meaningful for a PEFT policy (with a full policy it does nothing), as in TRL 1.12.
        """
        policy = self.accelerator.unwrap_model(self.model).policy
        if not hasattr(policy, "peft_config"):
            yield
            return
        from trl.trainer.utils import use_adapter

        with use_adapter(policy, self.args.ref_adapter_name):
            yield

    @torch.no_grad()
    def generate_completions(self, sampling: bool = False):
        """Sample a response to each eval prompt (temperature 0.01, as TRL 1.12) and show them with their score.

        Prints the first five rows as a table (rich if installed) and logs all of them to wandb / trackio when they
        are in `report_to`. `sampling=True` (the calls during training) stops after the first eval batch. Returns the
        table as a pandas DataFrame (columns `query`, `model response`, `score`), or None without an eval_dataset.
        """
        if self.eval_dataset is None:
            return None
        import pandas as pd
        from accelerate.utils import gather_object

        tokenizer = self.processing_class
        saved_config, was_training = self.generation_config, self.model.training
        greedy = copy.deepcopy(saved_config)
        greedy.temperature, greedy.top_k, greedy.top_p, greedy.do_sample = 0.01 + 1e-7, 0, 1.0, True
        self.generation_config = greedy
        self.model.eval()
        table = defaultdict(list)
        try:
            for batch in self.get_eval_dataloader():
                batch = {k: v.to(self.accelerator.device) for k, v in batch.items()}
                scored = self.score_rollouts(self.generate_rollouts(batch))
                queries = tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
                responses = [
                    tokenizer.decode(r[m.bool()]) for r, m in zip(scored["response"], scored["response_mask"])
                ]
                table["query"].extend(gather_object(queries))
                table["model response"].extend(gather_object(responses))
                table["score"].extend(self.accelerator.gather_for_metrics(scored["scores"]).float().cpu().tolist())
                if sampling:
                    break
        finally:
            self.generation_config = saved_config
            self.model.train(was_training)
        df = pd.DataFrame(table)
        if self.accelerator.is_main_process:
            _print_table(df.iloc[0:5])
            report_to = self.args.report_to or []
            if "wandb" in report_to:
                import wandb

                if wandb.run is not None:
                    wandb.log({"completions": wandb.Table(dataframe=df)})
            if "trackio" in report_to:
                import trackio

                trackio.log({"completions": trackio.Table(dataframe=df)})
        return df

    def _episode(self) -> int:
        """Prompts sampled so far (TRL 1.12's `state.episode`): every rollout buffer started counts whole."""
        return math.ceil(self.state.global_step / self.args.steps_per_rollout) * self.args.batch_size

    def _trl112_progress_metrics(self, logs: dict) -> dict:
        """`episode`, `eps` (episodes per second), `lr` and `val/ratio_var` under TRL 1.12's names."""
        episode = self._episode()
        self.state.episode = episode
        metrics = {"episode": episode, "lr": logs["learning_rate"]}
        if self._clock is not None:
            elapsed = time.time() - self._clock[0]
            metrics["eps"] = int((episode - self._clock[1]) / elapsed) if elapsed > 0 else 0
        ratios = self._metrics["train"].get("val/ratio") or []
        metrics["val/ratio_var"] = torch.tensor(ratios).var().item() if len(ratios) > 1 else 0.0
        return metrics


def _print_table(df) -> None:
    """Print a DataFrame as a rich table when rich is installed, as plain text otherwise."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(df.to_string())
        return
    table = Table(show_lines=True)
    for column in df.columns:
        table.add_column(str(column))
    for _, row in df.iterrows():
        table.add_row(*row.astype(str).tolist())
    Console().print(table)


class _TRL112Callback(TrainerCallback):
    """Keeps `state.episode`, starts the `eps` clock and calls `generate_completions(sampling=True)`.

    As in TRL 1.12: after rollout buffers 1, 1 + f, 1 + 2f, ... with f = max(1, num_total_batches //
    num_sample_generations), once the buffer's optimizer steps are done.
    """

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        state.episode = self.trainer._episode()
        self.trainer._clock = (time.time(), state.episode)

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self.trainer
        state.episode = trainer._episode()
        if args.num_sample_generations <= 0 or trainer.eval_dataset is None:
            return
        if state.global_step % args.steps_per_rollout:
            return
        update = state.global_step // args.steps_per_rollout
        frequency = max(1, (args.num_total_batches or update) // args.num_sample_generations)
        if (update - 1) % frequency == 0:
            trainer.generate_completions(sampling=True)
