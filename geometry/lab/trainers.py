"""The paper's RLVR and OPD estimators as TRL trainers, so the same recipe runs on a real model.

Both subclass TRL's ``GRPOTrainer`` and change only how a generation batch is scored, through the hook
TRL keeps for it: ``_generate_and_score_completions`` may return per-token advantages of shape (B, T),
which GRPO's loss multiplies into -log p(y_t) token by token. With ``num_iterations=1`` (one optimizer
step per generation batch, TRL's default) the importance ratio is exp(logp - logp.detach()) = 1, so the
gradient is exactly the policy gradient  -sum_t A_t grad log p_student(y_t)  (Shen et al., arXiv 2606.07082):

- ``RLVRTrainer``: GRPO with the paper's skip of zero-variance groups: a prompt whose ``num_generations``
  rewards are all equal carries no advantage, and its tokens are dropped from the loss and its normaliser
  (DAPO-style filtering, without refilling the batch); a step in which every group is flat takes no
  optimizer step at all (gradients left unset, so AdamW moves nothing, momentum included).
- ``OPDTrainer``: on-policy distillation. The student samples ``num_generations`` completions per prompt;
  the teacher scores every sampled token; A_t = -(log p_student(y_t) - log p_teacher(y_t)), the
  sampled-token reverse KL (not TRL's full-vocabulary ``DistillationTrainer``). Two controls of the paper:
  ``off_policy=True`` samples from the teacher instead, and ``alpha < 1`` mixes in GRPO's reward
  advantage, A_t = alpha A_OPD,t + (1 - alpha) A_GRPO.

Single process, or data parallel with groups kept on one rank (``per_device_train_batch_size`` a multiple
of ``num_generations``); the teacher is not sharded (no DeepSpeed / FSDP handling here).
"""

from __future__ import annotations

import torch
from trl import GRPOTrainer
from trl.trainer.utils import add_fused_lm_head


def _flat_groups(advantages: torch.Tensor, generations: int) -> torch.Tensor:
    """(B,) GRPO advantages -> (B,) bool, True on rows of a group whose rewards all agree.

    (r - mean) / (std + 1e-4) is exactly 0 for every row of a flat group and nonzero for every row of any
    other (a reward differing from the mean of a group that varies), so the advantages alone decide it."""
    flat = (advantages.view(-1, generations) == 0).all(dim=1)  # (B / G,)
    return flat.repeat_interleave(generations)


class RLVRTrainer(GRPOTrainer):
    """GRPOTrainer that skips prompt groups with zero reward variance (module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skipped_groups = 0  # prompt groups dropped so far
        self.skipped_steps = 0  # optimizer steps not taken: every group of the batch was flat
        self._nothing_to_learn = False

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        if not self.model.training:
            return out
        flat = _flat_groups(out["advantages"], self.num_generations)
        self.skipped_groups += int(flat.sum()) // self.num_generations
        mask = out["completion_mask"] * (~flat).to(out["completion_mask"].dtype)[:, None]  # (B, T)
        out["completion_mask"] = mask
        out["num_items_in_batch"] = self.accelerator.gather(mask.sum()).sum()
        self._nothing_to_learn = bool(flat.all())
        return out

    def training_step(self, model, inputs, num_items_in_batch):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self._nothing_to_learn:  # unset gradients: the optimizer skips every parameter this step
            model.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            self._nothing_to_learn = False
        return loss


class OPDTrainer(GRPOTrainer):
    """On-policy distillation by GRPO's machinery with per-token teacher advantages (module docstring).

    ``reward_funcs`` are still required by GRPOTrainer; they are logged, and used only when ``alpha < 1``.
    """

    def __init__(self, *args, teacher_model: torch.nn.Module, alpha: float = 1.0, off_policy: bool = False,
                 **kwargs):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"OPDTrainer: alpha must be in [0, 1], got {alpha}")
        super().__init__(*args, **kwargs)
        self.teacher = teacher_model.to(self.accelerator.device).eval().requires_grad_(False)
        # GRPO scores log-probs through a fused LM head it patches in (as it does for its ref_model)
        add_fused_lm_head(self.teacher, temperature=self.temperature,
                          cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32)
        self.alpha, self.off_policy = alpha, off_policy

    def _generate_single_turn(self, *args, **kwargs):
        if not self.off_policy:
            return super()._generate_single_turn(*args, **kwargs)
        student, self.model_wrapped = self.model_wrapped, self.teacher  # TRL generates with model_wrapped
        try:
            return super()._generate_single_turn(*args, **kwargs)
        finally:
            self.model_wrapped = student

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)  # (B, P + T)
        mask = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
        n = out["completion_ids"].size(1)
        with torch.no_grad():
            lp_s, _, _ = self._get_per_token_logps_and_entropies(self.model, ids, mask, n)  # (B, T)
            lp_t, _, _ = self._get_per_token_logps_and_entropies(self.teacher, ids, mask, n)  # (B, T)
        a_opd = -(lp_s - lp_t)  # (B, T) the sampled token's reverse-KL advantage
        adv = self.alpha * a_opd + (1.0 - self.alpha) * out["advantages"][:, None]  # (B, T)
        out["advantages"] = adv * out["completion_mask"]
        return out
