"""The demo's laboratory: a verifiable addition task, a char tokenizer, and a pretrained student/teacher.

Everything the geometry demo post-trains lives here; the measuring library does not import it.
Names load lazily, so that `geometry --help` (which reads lab.config) does not wait for transformers.
"""

from importlib import import_module

_WHERE = {
    "STUDENT": "models", "TEACHER": "models", "ModelConfig": "models", "build_model": "models",
    "load_model": "models", "n_params": "models",
    "PretrainConfig": "pretrain", "PretrainResult": "pretrain", "main_pretrain": "pretrain", "pretrain": "pretrain",
    "Problem": "task", "TaskConfig": "task", "accuracy": "task", "greedy_completions": "task",
    "make_problems": "task", "records": "task", "reward": "task",
    "build_tokenizer": "tokenizer", "load_tokenizer": "tokenizer",
    "OPDTrainer": "trainers", "RLVRTrainer": "trainers", "StudyConfig": "config", "rule_lr": "precision",
}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'geometry.lab' has no attribute {name!r}")
    return getattr(import_module(f"geometry.lab.{_WHERE[name]}"), name)
