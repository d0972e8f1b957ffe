"""The demo's laboratory: a verifiable addition task, a char tokenizer, and a pretrained student/teacher.

Everything the geometry demo post-trains lives here; the measuring library does not import it.
"""

from geometry.lab.models import STUDENT, TEACHER, ModelConfig, build_model, load_model, n_params
from geometry.lab.pretrain import PretrainConfig, PretrainResult, main_pretrain, pretrain
from geometry.lab.task import Problem, TaskConfig, accuracy, greedy_completions, make_problems, records, reward
from geometry.lab.tokenizer import build_tokenizer, load_tokenizer

__all__ = [
    "STUDENT", "TEACHER", "ModelConfig", "build_model", "load_model", "n_params",
    "PretrainConfig", "PretrainResult", "main_pretrain", "pretrain",
    "Problem", "TaskConfig", "accuracy", "greedy_completions", "make_problems", "records", "reward",
    "build_tokenizer", "load_tokenizer",
]
