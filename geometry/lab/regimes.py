"""The demo study's post-training runs, each recorded into a geometry store, all with TRL trainers.

The paper's three regimes (Shen et al., arXiv 2606.07082, appendices) from one student:
- SFT: TRL ``SFTTrainer``, cross-entropy on the reference answer, lr 10x OPD's, cosine decay;
- RLVR: GRPO with a 0/1 exact-answer reward, groups with zero reward variance skipped (``RLVRTrainer``);
- OPD: the student samples, the teacher scores each sampled token, advantage -(log p_s - log p_t)
  (``OPDTrainer``), the same prompts x samples per step as GRPO. Its controls use the same trainer:
  teacher rollouts (``off_policy``) and OPD's advantage mixed with GRPO's (``alpha``);
- a labelled variant: TRL's ``DistillationTrainer`` (the exact full-vocabulary reverse KL, one sample
  per prompt), which is not the paper's estimator.

The paper's precision regime: the student is a bf16 checkpoint (its weights are rounded to bf16 on
loading), training keeps float32 master weights as mixed-precision training does, and the recorder
stores bf16 snapshots, so the offline analysis compares bf16 checkpoints as the paper does. Learning
rates come from ``geometry.lab.precision`` (the paper's lr / bf16-spacing ratio); AdamW betas
(0.9, 0.98), weight decay 0.1, Adam eps 1e-15 for RLVR, as in the paper. Per-step tracking (the
recorder's subspace iteration) follows the float32 master weights.

Every run trains on the post-training task (``task.POSTTRAIN_TASK``, shifted from the student's pretraining) and
is scored by greedy exact-answer accuracy on the same held-out problems of that task before and after.
Same config, same machine and thread count -> same accuracy and same weights.
"""

from __future__ import annotations

import functools
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
from transformers import PrinterCallback
from transformers.utils import logging as hf_logging

from geometry.capture.callbacks import GeometryCallback, GradientProjectionCallback
from geometry.capture.recorder import RecorderConfig
from geometry.errors import GeometryError
from geometry.lab.models import load_model
from geometry.lab.precision import SFT_LR_RATIO, rule_lr
from geometry.lab.pretrain import EVAL_SEED_OFFSET
from geometry.lab.task import POSTTRAIN_TASK, accuracy, make_problems, records, reward
from geometry.lab.tokenizer import load_tokenizer

EVAL_SEED = EVAL_SEED_OFFSET  # pretraining's held-out stream (seed 0)
TRAIN_SEED = 20_000  # + cfg.seed: a problem stream neither pretraining (seed 0) nor the evaluation replays
MAX_NEW_TOKENS = POSTTRAIN_TASK.answer_digits + 2  # the longest answer + EOS, and one token to spare
MAX_GRAD_NORM = 1.0  # TRL's default clipping (the paper does not state one)
BETAS = (0.9, 0.98)  # the paper's AdamW betas
WEIGHT_DECAY = 0.1  # the paper's; at lr ~1e-6 it moves a weight by ~1e-7 of itself per step, far below bf16
RLVR_EPS = 1e-15  # the paper's Adam eps for RLVR (others keep 1e-8)
TRACK_K = 16  # top singular subspaces tracked per step: any K the study picks (<= 16) is read from them
PROJECTION_START = 0.2  # SPEC 9: gradients projected from 20% of training


@dataclass
class RegimeConfig:
    """One size for every run of the study; the regimes differ in their loss and learning rate.

    Sequences per optimizer step are ``batch * generations`` in every regime: GRPO and OPD sample
    ``generations`` completions for each of ``batch`` prompts; SFT and the full-KL variant (one sample
    per prompt) take ``batch * generations`` prompts.
    """

    # Optimizer steps, the same for every regime (the paper: SFT 5375, RLVR 1023, OPD 299): the paper's OPD count,
    # and 5 seeds of every run fit 20 minutes on 2 cores. Measured on seed 0 before any verdict (data/README.md):
    # SFT gains 3.9 points over the student (53.1% on 1000 problems), OPD 0.4, within the evaluation noise.
    steps: int = 300
    lr: float | None = None  # OPD and RLVR; None: precision.rule_lr of the student. SFT: 10x
    batch: int = 4  # prompts per step: 4 x 8 samples learn as much as 8 x 8 in 300 steps (measured) at half the time
    generations: int = 8  # the paper's 8 samples per prompt (GRPO group size, OPD samples)
    snapshot_every: int | None = None  # None: max(1, steps // 5) -> 5 snapshots at 20%, 40%, ... 100%
    lock_k: int = 16  # K of the gradient projection (SPEC 9); the study sets it by the paper's rule
    seed: int = 0  # trainer seed and training-problem stream
    eval_problems: int = 1000  # held-out problems (seed EVAL_SEED): one accuracy to about +-3 points (95%)
    threads: int = 1  # torch CPU threads while training; one avoids OpenMP waits on a shared machine

    def __post_init__(self):
        if min(self.steps, self.batch, self.lock_k, self.eval_problems, self.threads) < 1:
            raise GeometryError(f"RegimeConfig: steps, batch, lock_k, eval_problems and threads must be >= 1, "
                                f"got {self}")
        if self.generations < 2:  # a group of one has no spread: GRPO's advantage is undefined
            raise GeometryError(f"RegimeConfig: generations must be >= 2, got {self.generations}")
        if self.lr is not None and not self.lr > 0:
            raise GeometryError(f"RegimeConfig: lr must be positive, got {self.lr}")
        if self.snapshot_every is not None and self.snapshot_every < 1:
            raise GeometryError(f"RegimeConfig: snapshot_every must be >= 1 (or None), got {self.snapshot_every}")

    @classmethod
    def quick(cls) -> RegimeConfig:
        """A smoke-test size: ~2 s a run; accuracies on 100 problems are not a result."""
        return cls(steps=10, batch=4, generations=4, eval_problems=100)

    @property
    def sequences(self) -> int:
        return self.batch * self.generations

    def recorder_config(self) -> RecorderConfig:
        every = self.snapshot_every if self.snapshot_every is not None else max(1, self.steps // 5)
        return RecorderConfig(snapshot_every=every, track_every=1, lock_k=TRACK_K, seed=self.seed,
                              snapshot_dtype="bfloat16")  # checkpoints as the paper compares them


class TrainResult(NamedTuple):
    name: str  # the run's name in the study
    seed: int  # its training seed
    store: Path  # the geometry store written (base = the bf16-rounded student)
    steps: int  # optimizer steps counted (skipped ones included)
    lr: float  # its learning rate
    acc_before: float  # held-out greedy exact-answer accuracy of the student
    acc_after: float  # the same after training
    skipped: int  # optimizer steps skipped (RLVR: every group of the batch had zero reward variance)
    seconds: float  # wall time of training with recording; loading and the two evaluations excluded


# ---- shared machinery ----


def load_student(path: str | Path) -> torch.nn.Module:
    """The student as the paper's is: a bf16 checkpoint, here float32 tensors holding bf16 values (the
    master weights of mixed-precision training start from them)."""
    model = load_model(path)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16))
    return model


def measured_matrices(model: torch.nn.Module) -> list[torch.Tensor]:
    """The Linear weights the recorder measures (no embeddings, no lm_head)."""
    return [p.detach() for n, p in model.named_parameters()
            if p.dim() == 2 and "embed" not in n and "lm_head" not in n]


@functools.lru_cache(maxsize=4)
def study_lr(student: Path) -> float:
    """lr of OPD and RLVR by the precision rule, from the bf16-rounded student."""
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a run's first call comes before its quiet session (_session)
    try:
        return rule_lr(measured_matrices(load_student(student)))
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def learning_rates(cfg: RegimeConfig, student: Path) -> dict[str, float]:
    lr = cfg.lr if cfg.lr is not None else study_lr(Path(student).resolve())
    return {"sft": SFT_LR_RATIO * lr, "rlvr": lr, "opd": lr}


@functools.lru_cache(maxsize=4)
def _accuracy_before(student: Path, n: int) -> float:
    return accuracy(load_student(student), load_tokenizer(student), make_problems(n, EVAL_SEED, POSTTRAIN_TASK))


def teacher_accuracy(teacher: Path, n: int) -> float:
    """The teacher's accuracy on the evaluation problems, as OPD runs it (float32, not rounded)."""
    return accuracy(load_model(teacher), load_tokenizer(teacher), make_problems(n, EVAL_SEED, POSTTRAIN_TASK))


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


def _prompts(n: int, cfg: RegimeConfig, completions: bool = False) -> Dataset:
    data = Dataset.from_list(records(make_problems(n, TRAIN_SEED + cfg.seed, POSTTRAIN_TASK)))
    return data if completions else data.remove_columns("completion")


def _exact_reward(tokenizer) -> Callable[..., list[float]]:
    """GRPO's reward: 1 for the exact answer. Scored on the token ids decoded with their special tokens,
    as ``accuracy`` does (TRL's own ``completions`` drop them, so "35<bos>7" would pass as "357")."""
    def exact_answer(completions, answer, completion_ids, **kwargs) -> list[float]:
        return [reward(tokenizer.decode(ids, skip_special_tokens=False), a)
                for ids, a in zip(completion_ids, answer, strict=True)]
    return exact_answer


def _trl_args(config_cls, cfg: RegimeConfig, output_dir: Path, per_device: int, lr: float, *,
              schedule: str = "constant", eps: float = 1e-8, **extra):
    """TRL's config in the paper's optimizer settings, float32 master weights on the CPU."""
    return config_cls(
        output_dir=str(output_dir), max_steps=cfg.steps, learning_rate=lr, per_device_train_batch_size=per_device,
        lr_scheduler_type=schedule, warmup_steps=0, weight_decay=WEIGHT_DECAY, adam_beta1=BETAS[0],
        adam_beta2=BETAS[1], adam_epsilon=eps, max_grad_norm=MAX_GRAD_NORM,
        bf16=False, use_cpu=True, gradient_checkpointing=False,  # TRL defaults: bf16 and checkpointing on
        seed=cfg.seed, data_seed=cfg.seed, report_to="none", save_strategy="no",
        logging_strategy="no", disable_tqdm=True, **extra,
    )


def _grpo_args(cfg: RegimeConfig, work: Path, lr: float, **extra):
    from trl import GRPOConfig

    return _trl_args(GRPOConfig, cfg, work, cfg.sequences, lr, num_generations=cfg.generations,
                     max_completion_length=MAX_NEW_TOKENS, temperature=1.0, beta=0.0, **extra)


def _train(name: str, student: Path, out: Path, cfg: RegimeConfig, lr: float, build: Callable[..., object],
           projection: bool = False, teacher: Path | None = None, keep: Path | None = None) -> TrainResult:
    """Load the student (and teacher), build the trainer with ``build(model, tokenizer, output_dir, callbacks,
    teacher_model)``, train with the recorder (and the projection) attached, evaluate. ``keep``: a directory to
    save the trained model to (HF layout, float32 master weights), the starting point of a later regime."""
    out, student = Path(out), Path(student)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _session(cfg):
        acc_before = _accuracy_before(student.resolve(), cfg.eval_problems)
        tok, model = load_tokenizer(student), load_student(student)
        teacher_model = load_model(teacher) if teacher is not None else None
        callbacks = [GeometryCallback(out, cfg.recorder_config())]
        if projection:  # SPEC item 9: from 20% of training, gradients confined to the top-K right subspace
            callbacks.insert(0, GradientProjectionCallback(start_frac=PROJECTION_START, lock_k=cfg.lock_k,
                                                           side="right"))
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
        acc_after = accuracy(model, tok, make_problems(cfg.eval_problems, EVAL_SEED, POSTTRAIN_TASK))
        if keep is not None:
            model.save_pretrained(str(keep))
            tok.save_pretrained(str(keep))
    return TrainResult(name, cfg.seed, out, state.global_step, lr, acc_before, acc_after,
                       getattr(trainer, "skipped_steps", 0), seconds)


# ---- the regimes ----


def train_sft(student: Path, out: Path, cfg: RegimeConfig, *, name: str = "sft",
              projection: bool = False, keep: Path | None = None) -> TrainResult:
    """SFT: TRL SFTTrainer, cross-entropy on the reference answer (+ EOS), completion tokens only, cosine decay.
    ``keep``: where to save the trained model (the reference study's OPD and RLVR start from it)."""
    from trl import SFTConfig, SFTTrainer

    lr = learning_rates(cfg, student)["sft"]
    data = _prompts(cfg.steps * cfg.sequences, cfg, completions=True)

    def build(model, tok, work, callbacks, teacher_model):
        args = _trl_args(SFTConfig, cfg, work, cfg.sequences, lr, schedule="cosine", max_length=32)
        return SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, callbacks=callbacks)

    return _train(name, student, out, cfg, lr, build, projection, keep=keep)


def train_rlvr(student: Path, out: Path, cfg: RegimeConfig, *, name: str = "rlvr") -> TrainResult:
    """RLVR: GRPO (RLVRTrainer), 0/1 exact-answer reward, no KL penalty (beta=0), groups of ``generations``,
    zero-variance groups skipped. TRL's batch counts completions: ``batch`` distinct prompts per step."""
    from geometry.lab.trainers import RLVRTrainer

    lr = learning_rates(cfg, student)["rlvr"]
    data = _prompts(cfg.steps * cfg.batch, cfg)

    def build(model, tok, work, callbacks, teacher_model):
        return RLVRTrainer(model=model, reward_funcs=_exact_reward(tok), args=_grpo_args(cfg, work, lr, eps=RLVR_EPS),
                           train_dataset=data, processing_class=tok, callbacks=callbacks)

    return _train(name, student, out, cfg, lr, build)


def train_opd(student: Path, teacher: Path, out: Path, cfg: RegimeConfig, *, name: str = "opd",
              projection: bool = False, alpha: float = 1.0, off_policy: bool = False) -> TrainResult:
    """OPD, the paper's estimator (OPDTrainer): per-token advantage -(log p_s - log p_t) on ``generations``
    samples of each of ``batch`` prompts. Controls: ``off_policy`` (teacher samples), ``alpha`` < 1 (mixed
    with GRPO's advantage: alpha A_OPD + (1 - alpha) A_GRPO)."""
    from geometry.lab.trainers import OPDTrainer

    if not 0.0 <= alpha <= 1.0:
        raise GeometryError(f"train_opd: alpha must be in [0, 1], got {alpha}")
    lr = learning_rates(cfg, student)["opd"]
    data = _prompts(cfg.steps * cfg.batch, cfg)

    def build(model, tok, work, callbacks, teacher_model):
        return OPDTrainer(model=model, teacher_model=teacher_model, alpha=alpha, off_policy=off_policy,
                          reward_funcs=_exact_reward(tok), args=_grpo_args(cfg, work, lr), train_dataset=data,
                          processing_class=tok, callbacks=callbacks)

    return _train(name, student, out, cfg, lr, build, projection, teacher)


def train_opd_fullkl(student: Path, teacher: Path, out: Path, cfg: RegimeConfig, *,
                     name: str = "opd_fullkl") -> TrainResult:
    """A variant, not the paper's OPD: TRL DistillationTrainer, the exact full-vocabulary reverse KL (beta=1)
    at every sampled position, on-policy (trl 1.16 always samples from the student), one sample per prompt,
    ``batch * generations`` prompts per step, OPD's learning rate."""
    from trl import DistillationConfig, DistillationTrainer

    lr = learning_rates(cfg, student)["opd"]
    data = _prompts(cfg.steps * cfg.sequences, cfg)

    def build(model, tok, work, callbacks, teacher_model):
        args = _trl_args(DistillationConfig, cfg, work, cfg.sequences, lr, max_completion_length=MAX_NEW_TOKENS,
                         beta=1.0, temperature=1.0)
        return DistillationTrainer(model=model, teacher_model=teacher_model, args=args, train_dataset=data,
                                   processing_class=tok, callbacks=callbacks)

    return _train(name, student, out, cfg, lr, build, teacher=teacher)
