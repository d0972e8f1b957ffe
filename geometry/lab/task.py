"""The demo's verifiable task: multi-digit arithmetic, ``"12+345="`` -> ``"357"``, ``"345-12="`` -> ``"333"``.

Arithmetic has an exact answer a program can check, so one task serves all three regimes: SFT
trains on the answer, RLVR rewards an exact match (0/1), and on-policy distillation needs only
the prompt. Three named distributions (``TaskConfig``): the student pretrains on ``PRETRAIN_TASK``,
the teacher on ``TEACHER_TASK``, and every post-training run trains and is scored on ``POSTTRAIN_TASK``,
a shift to long operands that the student has seen rarely.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import NamedTuple

import torch

from geometry.errors import GeometryError

EOS_TEXT = "<eos>"  # the tokenizer's end token, as it appears in a decode that keeps specials


@dataclass(frozen=True)
class TaskConfig:
    """Which problems: operations, operand lengths, and how often each length is drawn."""

    min_digits: int = 1  # short operands keep easy, carry-free cases in the mix: reward is never all zero
    max_digits: int = 3
    ops: str = "+"  # one drawn uniformly per problem; "-" is a - b with a >= b (answers are never negative)
    weights: tuple[float, ...] | None = None  # relative frequency of each digit count min..max; None: uniform

    def __post_init__(self):
        if not 1 <= self.min_digits <= self.max_digits <= 9:
            raise GeometryError(
                f"task digits must satisfy 1 <= min_digits <= max_digits <= 9, got "
                f"{self.min_digits}..{self.max_digits}"
            )
        if not self.ops or set(self.ops) - set(OPS) or len(set(self.ops)) != len(self.ops):
            raise GeometryError(f"task ops must be distinct characters of {OPS!r}, got {self.ops!r}")
        n = self.max_digits - self.min_digits + 1
        if self.weights is not None and (len(self.weights) != n or min(self.weights) < 0 or not sum(self.weights) > 0):
            raise GeometryError(f"task weights must be {n} non-negative numbers, not all zero, got {self.weights}")

    def words(self) -> str:
        """e.g. "a+b and a-b, operands of 1-4 digits (4 digits at 0.25x the others' frequency)"."""
        text = f"{' and '.join(f'a{op}b' for op in self.ops)}, operands of {self.min_digits}-{self.max_digits} digits"
        if self.weights is not None and len(set(self.weights)) > 1:
            common = max(set(self.weights), key=self.weights.count)  # the others' weight
            odd = [f"{d} digits at {w / common:g}x" for d, w in
                   zip(range(self.min_digits, self.max_digits + 1), self.weights, strict=True) if w != common]
            text += f" ({', '.join(odd)} the others' frequency)"
        return text

    @property
    def answer_digits(self) -> int:
        """The longest answer: a sum of two max_digits numbers can have one digit more."""
        return self.max_digits + ("+" in self.ops)


OPS = "+-"
# The student's pretraining distribution, broad: both operations, operands of 1-4 digits, 4-digit ones at a quarter
# of a shorter length's frequency, so that problems with two long operands are rare (0.6%): the converged student
# has seen them without mastering them.
PRETRAIN_TASK = TaskConfig(min_digits=1, max_digits=4, ops="+-", weights=(1.0, 1.0, 1.0, 0.25))
# The teacher's: the same operations and lengths, long operands half the time, so it masters them.
TEACHER_TASK = TaskConfig(min_digits=1, max_digits=4, ops="+-", weights=(1.0, 1.0, 1.0, 3.0))
# The post-training task, shifted from the student's pretraining to long operands: 3 or 4 digits each, so three
# problems in four have a 4-digit operand (one in seven during pretraining), one in four two of them (1 in 170).
POSTTRAIN_TASK = TaskConfig(min_digits=3, max_digits=4, ops="+-")


class Problem(NamedTuple):
    prompt: str  # e.g. "12+345=", what the model is conditioned on
    answer: str  # e.g. "357", the exact completion expected before the end token


def _operand(rng: random.Random, cfg: TaskConfig) -> int:
    # A digit count first (uniform, or by weight), so 1-digit numbers are not swamped by the 900 3-digit ones.
    if cfg.weights is None:
        digits = rng.randint(cfg.min_digits, cfg.max_digits)
    else:
        digits = rng.choices(range(cfg.min_digits, cfg.max_digits + 1), weights=cfg.weights)[0]
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(low, 10**digits - 1)


def make_problems(n: int, seed: int, cfg: TaskConfig | None = None) -> list[Problem]:
    """``n`` problems drawn with their own RNG: the same (n, seed, cfg) always gives the same list."""
    cfg = cfg or TaskConfig()
    rng = random.Random(seed)
    problems = []
    for _ in range(n):
        a, b = _operand(rng, cfg), _operand(rng, cfg)
        op = cfg.ops if len(cfg.ops) == 1 else rng.choice(cfg.ops)  # one op: the RNG stream of addition alone
        if op == "-":
            a, b = max(a, b), min(a, b)
        problems.append(Problem(f"{a}{op}{b}=", str(a + b if op == "+" else a - b)))
    return problems


def reward(completion: str, answer: str) -> float:
    """1.0 iff the completion, cut at the first end token or newline, is exactly the answer."""
    text = completion.split(EOS_TEXT, 1)[0].split("\n", 1)[0]
    return 1.0 if text.strip() == answer else 0.0


def records(problems: list[Problem]) -> list[dict[str, str]]:
    """Rows for ``datasets.Dataset.from_list``: TRL's prompt-completion format plus the answer column.

    The completion carries no end token: SFTTrainer appends the tokenizer's EOS itself. GRPO reward
    functions receive the extra ``answer`` column as a keyword argument.
    """
    return [{"prompt": p.prompt, "completion": p.answer, "answer": p.answer} for p in problems]


@torch.no_grad()
def greedy_completions(model, tokenizer, prompts: list[str], max_new_tokens: int = 6,
                       batch_size: int = 512) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded batches), decoded up to and including EOS.

    Special tokens are kept in the text (the padding after EOS is cut off) so that a stray BOS or
    PAD inside an answer makes it wrong rather than being silently dropped.
    """
    was_training, threads = model.training, torch.get_num_threads()
    model.eval()
    # Decoding is thousands of tiny ops: one thread avoids OpenMP barrier waits, which on a busy
    # two-core machine made 500 problems take 16 s with two threads against 1.3 s with one.
    torch.set_num_threads(1)
    try:
        return _greedy(model, tokenizer, prompts, max_new_tokens, batch_size)
    finally:
        torch.set_num_threads(threads)
        model.train(was_training)


def _greedy(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    out = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True,
                          padding_side="left")
        ids = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        new = ids[:, batch["input_ids"].shape[1]:]  # (B, <= max_new_tokens)
        for row in new.tolist():
            cut = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
            out.append(tokenizer.decode(row[:cut], skip_special_tokens=False))
    return out


def accuracy(model, tokenizer, problems: list[Problem], batch_size: int = 512) -> float:
    """Fraction of problems whose greedy completion earns reward 1 (exact answer, then EOS)."""
    if not problems:
        raise GeometryError("accuracy needs at least one problem")
    longest = max(len(p.answer) for p in problems)
    completions = greedy_completions(model, tokenizer, [p.prompt for p in problems],
                                     max_new_tokens=longest + 2, batch_size=batch_size)
    return sum(reward(c, p.answer) for c, p in zip(completions, problems, strict=True)) / len(problems)
