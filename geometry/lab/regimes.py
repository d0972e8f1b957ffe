"""The demo study's post-training runs, each recorded into a geometry store.

Three regimes from one student, with the trainers users actually run (TRL): SFT on the reference
answers, RLVR (GRPO, 0/1 exact-answer reward) and on-policy distillation (OPD, per-token reverse KL
to the teacher). Plus the paper's controls (Shen et al., arXiv 2606.07082), which need a compact
loop of our own: off-policy rollouts, and OPD's advantage mixed with RLVR's (``train_opd_loop``).

Every run starts from the same student, trains on a seeded stream of fresh problems, is recorded
per step (GeometryCallback / Recorder: tracking every step, ``snapshot_every`` checkpoints and the
last step), and is scored by greedy exact-answer accuracy on the same held-out problems before
and after. Same config, same machine and thread count -> same accuracy and same weights.
"""

from __future__ import annotations

import inspect
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from datasets import Dataset
from datasets import disable_progress_bars as ds_disable_progress
from datasets import enable_progress_bars as ds_enable_progress
from datasets import is_progress_bar_enabled as ds_progress_enabled
from transformers import DynamicCache, PrinterCallback
from transformers.utils import logging as hf_logging

from geometry.capture.callbacks import GeometryCallback, GradientProjectionCallback
from geometry.capture.recorder import Recorder, RecorderConfig
from geometry.errors import GeometryError
from geometry.lab.models import load_model
from geometry.lab.pretrain import EVAL_SEED_OFFSET
from geometry.lab.task import accuracy, make_problems, records, reward
from geometry.lab.tokenizer import load_tokenizer

EVAL_SEED = EVAL_SEED_OFFSET  # pretraining's held-out stream (seed 0): acc_before is data/README.md's 47.4%
TRAIN_SEED = 20_000  # + cfg.seed: a problem stream neither pretraining (seed 0) nor the evaluation replays
MAX_NEW_TOKENS = 6  # the longest answer (4 digits) + EOS, and one token to spare
MAX_GRAD_NORM = 1.0  # TRL's default clipping, repeated by the compact loop


@dataclass
class RegimeConfig:
    """One size for every run of the study; the regimes differ only in their loss.

    Sequences per optimizer step are ``batch * generations`` in every regime: GRPO and the compact loop
    sample ``generations`` completions for each of ``batch`` prompts; SFT and TRL's OPD (one sample per
    prompt) take ``batch * generations`` prompts. Optimizer everywhere: AdamW, no weight decay, betas
    (0.9, 0.999), constant lr, no warm-up, gradient clipping at 1.0 (TRL's defaults, lr aside).
    """

    steps: int = 200  # optimizer steps
    # One lr for all, as in the paper, and small: the paper's geometry (bf16 sparsity above all) comes from
    # updates small beside the weights' bf16 resolution (its lr 1e-6 on an 8B model). Measured at 200 steps:
    # every regime still learns (SFT 47 -> 61%, GRPO -> 54%, OPD -> 60%); 5e-5 learns faster but moves every
    # entry past bf16 resolution in every regime; 1e-4 stalls GRPO and 2e-4 collapses it and the loop.
    lr: float = 1e-5
    batch: int = 8  # prompts per step (see the class docstring)
    generations: int = 8  # GRPO group size / samples per prompt of the compact loop
    snapshot_every: int | None = None  # None: max(1, steps // 5) -> 5 snapshots at 20%, 40%, ... 100%
    lock_k: int = 16  # K of SPEC item 7 (Sim_16): tracked and compared for locking
    seed: int = 0  # trainer seed and training-problem stream
    eval_problems: int = 500  # held-out problems (seed EVAL_SEED): accuracy to about +-2 points
    threads: int = 1  # torch CPU threads while training; one avoids OpenMP waits on a shared machine

    def __post_init__(self):
        if min(self.steps, self.batch, self.lock_k, self.eval_problems, self.threads) < 1:
            raise GeometryError(f"RegimeConfig: steps, batch, lock_k, eval_problems and threads must be >= 1, "
                                f"got {self}")
        if self.generations < 2:  # a group of one has no spread: GRPO's advantage is undefined
            raise GeometryError(f"RegimeConfig: generations must be >= 2, got {self.generations}")
        if not self.lr > 0:
            raise GeometryError(f"RegimeConfig: lr must be positive, got {self.lr}")
        if self.snapshot_every is not None and self.snapshot_every < 1:
            raise GeometryError(f"RegimeConfig: snapshot_every must be >= 1 (or None), got {self.snapshot_every}")

    @classmethod
    def default(cls) -> RegimeConfig:
        """The study's size. Measured on the 2-core reference machine, one thread, other jobs running: the
        nine runs and the analysis take 4.8 min, every run gains 8-15 points of accuracy (47.4% before)."""
        return cls()

    @classmethod
    def quick(cls) -> RegimeConfig:
        """A smoke-test size: ~2 s a run (~20 s for the nine); accuracies on 100 problems are not a result."""
        return cls(steps=10, batch=4, eval_problems=100)

    @property
    def sequences(self) -> int:
        return self.batch * self.generations

    def recorder_config(self) -> RecorderConfig:
        every = self.snapshot_every if self.snapshot_every is not None else max(1, self.steps // 5)
        return RecorderConfig(snapshot_every=every, track_every=1, lock_k=self.lock_k, seed=self.seed)


class TrainResult(NamedTuple):
    name: str  # the run's name in the study
    store: Path  # the geometry store written (base = the student)
    steps: int  # optimizer steps taken
    acc_before: float  # held-out greedy exact-answer accuracy of the student
    acc_after: float  # the same after training
    seconds: float  # wall time of training with recording; loading and the two evaluations excluded


# ---- shared machinery ----


@contextmanager
def _session(cfg: RegimeConfig) -> Iterator[None]:
    """cfg.threads torch threads, and quiet: no progress bars from model loading or TRL's dataset preparation,
    no deprecation notes from TRL's configs (the study prints its own summary). All restored afterwards."""
    old, bars_hf, bars_ds = torch.get_num_threads(), hf_logging.is_progress_bar_enabled(), ds_progress_enabled()
    torch.set_num_threads(cfg.threads)
    hf_logging.disable_progress_bar()
    ds_disable_progress()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*gradient_checkpointing", category=FutureWarning)
            yield
    finally:
        torch.set_num_threads(old)
        if bars_hf:
            hf_logging.enable_progress_bar()
        if bars_ds:
            ds_enable_progress()


def _held_out(cfg: RegimeConfig):
    return make_problems(cfg.eval_problems, EVAL_SEED)


def _train_problems(n: int, cfg: RegimeConfig):
    return make_problems(n, TRAIN_SEED + cfg.seed)


def _exact_reward(tokenizer) -> Callable[..., list[float]]:
    """GRPO's reward: 1 for the exact answer. Scored on the token ids decoded with their special tokens,
    as ``accuracy`` does (TRL's own ``completions`` drop them, so "35<bos>7" would pass as "357")."""
    def exact_answer(completions, answer, completion_ids, **kwargs) -> list[float]:
        return [reward(tokenizer.decode(ids, skip_special_tokens=False), a)
                for ids, a in zip(completion_ids, answer, strict=True)]
    return exact_answer


def _trl_args(config_cls, cfg: RegimeConfig, output_dir: Path, per_device: int, **extra):
    """TRL's config with every default that does not suit a float32 CPU demo overridden."""
    return config_cls(
        output_dir=str(output_dir), max_steps=cfg.steps, learning_rate=cfg.lr, per_device_train_batch_size=per_device,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=MAX_GRAD_NORM,
        bf16=False, use_cpu=True, gradient_checkpointing=False,  # TRL defaults: bf16 and checkpointing on
        seed=cfg.seed, data_seed=cfg.seed, report_to="none", save_strategy="no",
        logging_strategy="no", disable_tqdm=True, **extra,
    )


def _train_trl(name: str, student: Path, out: Path, cfg: RegimeConfig, build: Callable[..., object],
               projection: bool, teacher: Path | None = None) -> TrainResult:
    """Load the student (and teacher), evaluate, build the trainer with ``build(model, tokenizer, output_dir,
    callbacks, teacher_model)``, train with the recorder (and the projection) attached, evaluate again."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _session(cfg):
        tok, model = load_tokenizer(student), load_model(student)
        teacher_model = load_model(teacher) if teacher is not None else None
        held_out = _held_out(cfg)
        acc_before = accuracy(model, tok, held_out)
        callbacks = [GeometryCallback(out, cfg.recorder_config())]
        if projection:  # SPEC item 9: from 20% of training, gradients confined to the top-K right subspace
            callbacks.insert(0, GradientProjectionCallback(start_frac=0.2, lock_k=cfg.lock_k, side="right"))
        # The trainer's own folder sits beside the store (never inside it) and is removed afterwards.
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}-trainer-", dir=out.parent))
        try:
            start = time.perf_counter()
            trainer = build(model, tok, work, callbacks, teacher_model)
            trainer.remove_callback(PrinterCallback)  # with tqdm off it prints the end-of-training metrics dict
            state = trainer.train()
            seconds = time.perf_counter() - start
        finally:
            shutil.rmtree(work, ignore_errors=True)
        acc_after = accuracy(model, tok, held_out)
    return TrainResult(name, out, state.global_step, acc_before, acc_after, seconds)


# ---- the three regimes, with TRL ----


def train_sft(student: Path, out: Path, cfg: RegimeConfig, *, name: str = "sft",
              projection: bool = False) -> TrainResult:
    """SFT: TRL SFTTrainer, cross-entropy on the reference answer (+ EOS), completion tokens only."""
    from trl import SFTConfig, SFTTrainer

    data = Dataset.from_list(records(_train_problems(cfg.steps * cfg.sequences, cfg)))

    def build(model, tok, work, callbacks, teacher_model):
        args = _trl_args(SFTConfig, cfg, work, cfg.sequences, max_length=32)
        return SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, callbacks=callbacks)

    return _train_trl(name, student, out, cfg, build, projection)


def train_rlvr(student: Path, out: Path, cfg: RegimeConfig, *, name: str = "rlvr") -> TrainResult:
    """RLVR: TRL GRPOTrainer, 0/1 exact-answer reward, no KL penalty (beta=0), groups of ``generations``.

    TRL's batch counts completions: ``batch * generations`` of them, ``batch`` distinct prompts per step.
    """
    from trl import GRPOConfig, GRPOTrainer

    data = Dataset.from_list(records(_train_problems(cfg.steps * cfg.batch, cfg))).remove_columns("completion")

    def build(model, tok, work, callbacks, teacher_model):
        args = _trl_args(GRPOConfig, cfg, work, cfg.sequences, num_generations=cfg.generations,
                         max_completion_length=MAX_NEW_TOKENS, temperature=1.0, beta=0.0)
        return GRPOTrainer(model=model, reward_funcs=_exact_reward(tok), args=args, train_dataset=data,
                           processing_class=tok, callbacks=callbacks)

    return _train_trl(name, student, out, cfg, build, projection=False)


def train_opd(student: Path, teacher: Path, out: Path, cfg: RegimeConfig, *, name: str = "opd",
              projection: bool = False) -> TrainResult:
    """OPD: TRL DistillationTrainer, reverse KL (beta=1) to the teacher at temperature 1.

    In trl 1.16 the DistillationTrainer is always on-policy (the student samples every completion; the
    config has no ``lmbda`` mixing in teacher or dataset completions) and its loss is the full-vocabulary
    reverse KL per sampled position. One sample per prompt, ``batch * generations`` prompts per step.
    """
    from trl import DistillationConfig, DistillationTrainer

    data = Dataset.from_list(records(_train_problems(cfg.steps * cfg.sequences, cfg))).remove_columns("completion")

    def build(model, tok, work, callbacks, teacher_model):
        args = _trl_args(DistillationConfig, cfg, work, cfg.sequences, max_completion_length=MAX_NEW_TOKENS,
                         beta=1.0, temperature=1.0)
        return DistillationTrainer(model=model, teacher_model=teacher_model, args=args, train_dataset=data,
                                   processing_class=tok, callbacks=callbacks)

    return _train_trl(name, student, out, cfg, build, projection, teacher)


# ---- the controls: a compact loop ----


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)  # (N, T) left padding: every sequence starts at position 0


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], max_new_tokens: int, gen: torch.Generator):
    """Ancestral sampling at temperature 1 (no top-k / top-p), stopping at EOS; seeded by ``gen``.

    Returns ids (N, P + C) with left-padded prompts, their attention mask, and the completion mask
    (N, C): 1 on generated tokens up to and including the first EOS. A KV cache makes it ~3x faster
    than re-running the prefix (same samples).
    """
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    ids, mask = enc["input_ids"], enc["attention_mask"]  # (N, P)
    done = torch.zeros(len(prompts), dtype=torch.bool)
    cache = _kv_cache(model)
    new, pos = ids, _positions(mask)
    for _ in range(max_new_tokens):
        logits = model(input_ids=new, attention_mask=mask, position_ids=pos, use_cache=True, **cache).logits
        probs = torch.softmax(logits[:, -1].float(), dim=-1)  # (N, V)
        nxt = torch.multinomial(probs, 1, generator=gen).squeeze(1)  # (N,)
        nxt = torch.where(done, tokenizer.pad_token_id, nxt)  # finished rows get padding, masked out
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        mask = torch.cat([mask, (~done).long()[:, None]], dim=1)
        new, pos = nxt[:, None], pos[:, -1:] + 1  # (N, 1) the next forward sees only the new token
        done |= nxt == tokenizer.eos_token_id
        if done.all():
            break
    return ids, mask, mask[:, enc["input_ids"].shape[1]:]


def _kv_cache(model) -> dict:
    # transformers 5.x renamed forward's ``past_key_values`` to ``cache`` (the old name warns)
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {key: DynamicCache(config=model.config)}


def token_logprobs(model, ids: torch.Tensor, mask: torch.Tensor, n_completion: int) -> torch.Tensor:
    """log p(y_t | y_<t) of the last ``n_completion`` tokens of ``ids`` under ``model``: (N, C)."""
    logits = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=False).logits
    logits = logits[:, -n_completion - 1:-1].float()  # (N, C, V) the positions that predict the completion
    return torch.log_softmax(logits, dim=-1).gather(-1, ids[:, -n_completion:, None]).squeeze(-1)


def group_advantages(rewards: torch.Tensor, generations: int) -> torch.Tensor:
    """GRPO's advantage (r - group mean) / (group std + 1e-4), unbiased std as in TRL: (N,) -> (N,)."""
    groups = rewards.view(-1, generations)  # (B, G)
    adv = (groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)
    return adv.reshape(-1)


def mixed_loss(student, teacher, tokenizer, problems, cfg: RegimeConfig, alpha: float, off_policy: bool,
               gen: torch.Generator) -> torch.Tensor:
    """One step's loss: -mean over sampled tokens of [alpha A_OPD + (1 - alpha) A_RLVR] log p_student(y_t)."""
    prompts = [p.prompt for p in problems for _ in range(cfg.generations)]  # groups are contiguous
    answers = [p.answer for p in problems for _ in range(cfg.generations)]
    ids, mask, cmask = sample(teacher if off_policy else student, tokenizer, prompts, MAX_NEW_TOKENS, gen)
    C = cmask.shape[1]
    lp_s = token_logprobs(student, ids, mask, C)  # (N, C) with grad
    with torch.no_grad():
        lp_t = token_logprobs(teacher, ids, mask, C)  # (N, C)
    a_opd = -(lp_s.detach() - lp_t)  # (N, C) per-token reverse-KL advantage
    texts = tokenizer.batch_decode(ids[:, -C:], skip_special_tokens=False)  # pads after EOS: reward cuts there
    r = torch.tensor([reward(t, a) for t, a in zip(texts, answers, strict=True)])  # (N,)
    a_rlvr = group_advantages(r, cfg.generations)[:, None]  # (N, 1) broadcast over the sequence's tokens
    adv = alpha * a_opd + (1.0 - alpha) * a_rlvr  # (N, C)
    valid = cmask.float()
    return -(adv * lp_s * valid).sum() / valid.sum().clamp(min=1.0)


def train_opd_loop(student: Path, teacher: Path, out: Path, cfg: RegimeConfig, *, name: str,
                   alpha: float = 1.0, off_policy: bool = False) -> TrainResult:
    """The paper's controls: OPD with off-policy rollouts, or with its advantage mixed with RLVR's.

    Per step: ``generations`` samples for each of ``batch`` prompts, from the student (on-policy) or the
    teacher (``off_policy``), temperature 1, at most MAX_NEW_TOKENS, stopping at EOS. For each sampled token
        A_OPD = -(log p_student(y_t) - log p_teacher(y_t))      (detached; the sampled-token reverse KL)
        A_RLVR = (r - mean_group r) / (std_group r + 1e-4)       (the sequence's 0/1 reward, GRPO-normalised)
        loss = -mean over valid tokens of (alpha A_OPD + (1 - alpha) A_RLVR) log p_student(y_t)
    AdamW (no weight decay, TRL's betas), the same constant lr, clipping at 1.0. Recorded with the
    framework-free Recorder, with the same RecorderConfig as the TRL runs.

    Why a loop of our own: TRL's DistillationTrainer has no off-policy mode and no way to mix in a reward
    advantage, and its loss is the full-vocabulary KL rather than this sampled-token policy gradient. So the
    controls are compared with ``alpha=1`` on-policy run of this same loop (the loop's own OPD reference),
    not with ``train_opd``; the two OPD runs together show whether the estimator changes the geometry.
    """
    if not 0.0 <= alpha <= 1.0:
        raise GeometryError(f"train_opd_loop: alpha must be in [0, 1], got {alpha}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _session(cfg):
        tok, model, teacher_model = load_tokenizer(student), load_model(student), load_model(teacher)
        held_out = _held_out(cfg)
        acc_before = accuracy(model, tok, held_out)
        problems = _train_problems(cfg.steps * cfg.batch, cfg)
        gen = torch.Generator().manual_seed(cfg.seed)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0, fused=True)  # TRL's adamw_torch_fused
        model.train()
        start = time.perf_counter()
        with Recorder(model, out, cfg.recorder_config()) as rec:
            for step in range(1, cfg.steps + 1):
                batch = problems[(step - 1) * cfg.batch: step * cfg.batch]
                loss = mixed_loss(model, teacher_model, tok, batch, cfg, alpha, off_policy, gen)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
                opt.step()
                rec.step(step)
        seconds = time.perf_counter() - start
        acc_after = accuracy(model, tok, held_out)
    return TrainResult(name, out, cfg.steps, acc_before, acc_after, seconds)
