"""Pretrain the demo's student (to convergence on a broad task) and teacher (to high accuracy on the shifted one).

A plain PyTorch loop: fresh seeded problems every step, cross-entropy on the answer and EOS only
(the operands are random, so predicting them teaches nothing). The student trains its whole cosine
schedule on ``task.PRETRAIN_TASK`` (both operations, long operands rare), ending with a flat loss curve;
post-training then moves it to ``task.POSTTRAIN_TASK`` (long operands), where it starts part-way. The
teacher trains on every length equally often until it is near-perfect on the post-training task, so
on-policy distillation has something to teach.

Entry point for the CLI: ``main_pretrain(out="data", seed=0, quick=False)``.
"""

from __future__ import annotations

import csv
import math
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import torch

from geometry.errors import GeometryError
from geometry.lab.models import KINDS, build_model, n_params
from geometry.lab.task import POSTTRAIN_TASK, PRETRAIN_TASK, TEACHER_TASK, Problem, TaskConfig, accuracy, make_problems
from geometry.lab.tokenizer import build_tokenizer

EVAL_SEED_OFFSET = 10_000  # eval problems come from seed + offset: a stream the training RNG never replays
CURVE = "pretrain_curve.csv"  # written beside each model: step, loss, held-out accuracies


@dataclass
class PretrainConfig:
    steps: int  # optimizer steps of the cosine schedule; the run stops earlier only once ``target`` is reached
    target: float | None  # held-out accuracy on ``task`` at which to stop; None: train every step (convergence)
    task: TaskConfig = field(default_factory=lambda: PRETRAIN_TASK)  # the problems trained on
    lr: float = 1e-3  # AdamW peak; tiny models from scratch tolerate and need a large step
    batch: int = 64  # problems per step: a step costs ~0.1 s (student) on a busy two-core machine
    warmup: int = 100  # linear warm-up steps, then cosine decay to 10% over ``steps``
    eval_every: int = 250  # steps between checks: mean training loss since the last one, held-out accuracies
    eval_size: int = 500  # held-out problems per task: accuracy to about +-4 points (95%)
    weight_decay: float = 0.01
    checkpoints: tuple[tuple[int, str], ...] = ()  # (step, directory name): the model as it was at that step,
    # saved beside the finished one (``out_dir.parent / name``), e.g. a less-trained base
    then: PretrainConfig | None = None  # a further phase on the same model, fresh optimizer and schedule

    def __post_init__(self):
        if self.steps < 1 or self.batch < 1 or self.eval_every < 1 or self.eval_size < 1:
            raise GeometryError(f"pretraining sizes must be positive, got {self}")
        if any(not 0 < step <= self.steps for step, _ in self.checkpoints):
            raise GeometryError(f"pretraining checkpoints must lie within the {self.steps} steps, got "
                                f"{self.checkpoints}")
        if self.target is not None and not 0.0 < self.target <= 1.0:
            raise GeometryError(f"pretraining target accuracy must be in (0, 1], got {self.target}")


# Why these: the student trains its whole schedule, its loss flat over the last steps (data/README.md): it has
# converged on its task; its checkpoint at BASE_STEP, half-way, is the reference study's less-trained base (SFT
# starts there). The teacher (2.2x the student's parameters, ~2x its cost per step) trains on every length, long
# operands most, then a second phase on the post-training task itself: the paper's teacher (Qwen3-32B) is strong on
# the task it distils, and a teacher wrong on a third of some problems pulls the student towards wrong answers.
BASE_STEP = 2000
PRETRAIN_STEPS = 4000  # the student's
DEFAULTS = {
    "student": PretrainConfig(steps=PRETRAIN_STEPS, target=None, task=PRETRAIN_TASK,
                              checkpoints=((BASE_STEP, "base"),)),
    "teacher": PretrainConfig(steps=4000, target=0.98, task=TEACHER_TASK,
                              then=PretrainConfig(steps=2000, target=None, task=POSTTRAIN_TASK, lr=3e-4, warmup=50)),
}


class Check(NamedTuple):
    step: int  # optimizer steps taken
    loss: float  # mean training loss over the steps since the previous check
    accuracy: float  # held-out greedy exact-answer accuracy on the task trained on


class PretrainResult(NamedTuple):
    kind: str  # "student" or "teacher"
    steps: int  # optimizer steps actually taken
    accuracy: float  # held-out accuracy on the task trained on, at the end
    posttrain_accuracy: float  # held-out accuracy on the post-training task, at the end
    params: int  # parameter count
    seconds: float  # wall time of training and evaluation
    curve: list[Check]  # one row per check


def batch_tensors(problems: list[Problem], tokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``<bos> prompt answer <eos>`` ids, attention mask, and labels (-100 off the answer)."""
    rows, labels = [], []
    for p in problems:
        prompt = tokenizer(p.prompt)["input_ids"]  # BOS-prefixed, as the trainers tokenise prompts
        answer = tokenizer(p.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)  # (B, T)
    lab = torch.full((len(rows), width), -100)  # (B, T)
    for i, (r, lb) in enumerate(zip(rows, labels, strict=True)):
        ids[i, : len(r)] = torch.tensor(r)
        lab[i, : len(lb)] = torch.tensor(lb)
    return ids, (ids != tokenizer.pad_token_id).long(), lab


def _lr_factor(step: int, cfg: PretrainConfig) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def pretrain(kind: str, out_dir: str | Path | None, seed: int = 0, cfg: PretrainConfig | None = None,
             log=print) -> PretrainResult:
    """Train the ``kind`` model from a seeded init on ``cfg.task`` for ``cfg.steps`` (or until ``cfg.target``),
    then through ``cfg.then`` (a further phase with a fresh optimizer and schedule) if set; score it on the
    post-training task; save it to ``out_dir`` with its curve (``CURVE``; a later phase's steps continue the
    count).

    Deterministic for a given seed on a given machine (torch's CPU kernels with a fixed thread count).
    Saves config.json, model.safetensors, generation_config.json and tokenizer files, in float32.
    """
    if kind not in KINDS:
        raise GeometryError(f"unknown model kind {kind!r}; expected one of {sorted(KINDS)}")
    cfg = cfg or DEFAULTS[kind]
    tokenizer = build_tokenizer()
    model = build_model(KINDS[kind], seed=seed)
    phases = [cfg]
    while phases[-1].then is not None:
        phases.append(phases[-1].then)
    start, curve = time.perf_counter(), []
    for i, phase in enumerate(phases):  # phase i draws from seed + i: the first's stream is the one-phase schedule's
        curve += train_phase(model, tokenizer, phase, seed + i, kind, out_dir, log,
                             first_step=curve[-1].step if curve else 0)
    shifted = accuracy(model, tokenizer, make_problems(phases[-1].eval_size, seed + EVAL_SEED_OFFSET, POSTTRAIN_TASK))
    result = PretrainResult(kind, curve[-1].step, curve[-1].accuracy, shifted, n_params(model),
                            time.perf_counter() - start, curve)
    if out_dir is not None:
        save(model, tokenizer, Path(out_dir), curve)
    return result


def train_phase(model, tokenizer, cfg: PretrainConfig, seed: int, kind: str, out_dir: str | Path | None, log=print,
                first_step: int = 0) -> list[Check]:
    """One phase of pretraining in place: AdamW with warm-up and cosine decay over ``cfg.steps``, fresh problems of
    ``cfg.task`` each step (stream seeded by ``seed``), checks every ``cfg.eval_every`` steps on held-out
    problems of that task; stops early at ``cfg.target``; saves ``cfg.checkpoints`` beside ``out_dir``."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg))
    rng = random.Random(seed)  # the training stream: one fresh seed per step
    held_out = make_problems(cfg.eval_size, seed + EVAL_SEED_OFFSET, cfg.task)
    step, losses, curve = 0, [], []
    model.train()
    while step < cfg.steps:
        ids, mask, labels = batch_tensors(make_problems(cfg.batch, rng.getrandbits(32), cfg.task), tokenizer)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        losses.append(loss.item())
        if step % cfg.eval_every == 0 or step == cfg.steps:
            check = Check(first_step + step, sum(losses) / len(losses), accuracy(model, tokenizer, held_out))
            losses = []
            curve.append(check)
            log(f"{kind} step {check.step}: loss {check.loss:.4f}, held-out accuracy {check.accuracy:.3f}")
            if cfg.target is not None and check.accuracy >= cfg.target:
                break
        if out_dir is not None and (name := dict(cfg.checkpoints).get(step)):
            save(model, tokenizer, Path(out_dir).parent / name, curve)
    return curve


def save(model, tokenizer, out_dir: Path, curve: list[Check] = ()) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.to(torch.float32).save_pretrained(str(out_dir))  # safetensors + config + generation_config
    tokenizer.save_pretrained(str(out_dir))
    if curve:
        with open(out_dir / CURVE, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(Check._fields)
            w.writerows([c.step, f"{c.loss:.6f}", f"{c.accuracy:.4f}"] for c in curve)


def _quick(cfg: PretrainConfig) -> PretrainConfig:
    """The same phases and checkpoints at 30 steps each: a smoke test of the pipeline."""
    return replace(cfg, steps=30, warmup=10, eval_every=30, eval_size=100,
                   checkpoints=tuple((min(30, step), name) for step, name in cfg.checkpoints),
                   then=cfg.then and _quick(cfg.then))


def main_pretrain(out: str = "data", seed: int = 0, quick: bool = False, threads: int = 1,
                  log=print) -> list[PretrainResult]:
    """``geometry lab pretrain [--out data] [--seed 0] [--quick]``: write ``out/student`` and ``out/teacher``.

    ``quick`` runs a few dozen steps per model (a smoke test of the pipeline, not usable models).
    ``threads``: torch CPU threads (the shipped models were trained with one: on a shared two-core machine
    OpenMP waits dominate).
    """
    torch.set_num_threads(threads)
    results = []
    for kind in ("student", "teacher"):
        cfg = _quick(DEFAULTS[kind]) if quick else DEFAULTS[kind]
        res = pretrain(kind, Path(out) / kind, seed=seed, cfg=cfg, log=log)
        log(f"{kind}: {res.params:,} params, {res.steps} steps, accuracy {res.accuracy:.3f} (post-training task "
            f"{res.posttrain_accuracy:.3f}), {res.seconds:.0f} s")
        results.append(res)
    return results
