"""The demo lab: task, tokenizer, models, and the shipped pretrained student and teacher."""

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from geometry.errors import GeometryError
from geometry.lab.models import STUDENT, TEACHER, ModelConfig, build_model, load_model, n_params
from geometry.lab.pretrain import PretrainConfig, batch_tensors, pretrain
from geometry.lab.task import (
    POSTTRAIN_TASK,
    PRETRAIN_TASK,
    TEACHER_TASK,
    TaskConfig,
    accuracy,
    greedy_completions,
    make_problems,
    records,
    reward,
)
from geometry.lab.tokenizer import PASSTHROUGH_CHAT_TEMPLATE, build_tokenizer, load_tokenizer

DATA = Path(__file__).resolve().parent.parent / "data"


def test_problems_are_seeded_and_correct():
    a, b = make_problems(200, seed=3), make_problems(200, seed=3)
    assert a == b
    assert a != make_problems(200, seed=4)
    for p in a:
        x, y = p.prompt.rstrip("=").split("+")
        assert int(x) + int(y) == int(p.answer)
        assert 1 <= len(x) <= 3 and 1 <= len(y) <= 3
    lengths = {len(p.prompt.split("+")[0]) for p in make_problems(300, 0, TaskConfig(2, 4))}
    assert lengths == {2, 3, 4}
    with pytest.raises(GeometryError):
        TaskConfig(min_digits=3, max_digits=2)
    for bad in (dict(ops="*"), dict(ops="++"), dict(weights=(1.0, 1.0)), dict(weights=(0.0, 0.0, 0.0))):
        with pytest.raises(GeometryError):
            TaskConfig(**bad)


def test_subtraction_and_weighted_lengths():
    problems = make_problems(4000, seed=5, cfg=TaskConfig(1, 4, ops="+-", weights=(1.0, 1.0, 1.0, 0.1)))
    for p in problems:
        op = "+" if "+" in p.prompt else "-"
        x, y = map(int, p.prompt.rstrip("=").split(op))
        assert int(p.answer) == (x + y if op == "+" else x - y) >= 0
    assert 0.4 < sum("-" in p.prompt for p in problems) / len(problems) < 0.6
    long = sum(len(q) == 4 for p in problems for q in p.prompt.rstrip("=").replace("-", "+").split("+"))
    assert 0.02 < long / (2 * len(problems)) < 0.05  # 0.1 / 3.1 of the operands
    assert TaskConfig(3, 4, ops="+-").answer_digits == 5 and TaskConfig(1, 4, ops="-").answer_digits == 4


def test_pretraining_and_posttraining_tasks_differ_as_stated():
    """The student pretrains on every length with 4-digit operands rare, the teacher with them frequent;
    post-training asks for long operands only."""
    assert PRETRAIN_TASK.ops == POSTTRAIN_TASK.ops == TEACHER_TASK.ops == "+-"
    assert PRETRAIN_TASK.max_digits == TEACHER_TASK.max_digits == POSTTRAIN_TASK.max_digits == 4
    assert POSTTRAIN_TASK.min_digits == 3 and POSTTRAIN_TASK.weights is None
    assert PRETRAIN_TASK.weights[-1] < min(PRETRAIN_TASK.weights[:-1])
    assert TEACHER_TASK.weights[-1] > max(TEACHER_TASK.weights[:-1])


def test_gavish_donoho_signal_rank_planted():
    """Pure noise has signal rank 0; a planted rank-3 signal well above the noise gives 3; omega at beta = 1 is
    Gavish & Donoho's 2.858 (eq. 5 approximation: 2.86)."""
    from geometry.lab.structure import gap, gd_omega, module_spectra, signal_rank

    g = torch.Generator().manual_seed(0)
    noise = torch.randn(128, 384, generator=g)
    u, v = torch.linalg.qr(torch.randn(128, 3, generator=g)).Q, torch.linalg.qr(torch.randn(384, 3, generator=g)).Q
    signal = u @ torch.diag(torch.tensor([80.0, 60.0, 50.0])) @ v.T
    assert signal_rank(torch.linalg.svdvals(noise), (128, 384)) == 0
    assert signal_rank(torch.linalg.svdvals(noise + signal), (128, 384)) == 3
    assert gd_omega(1.0) == pytest.approx(2.86, abs=1e-9)
    assert gap(torch.tensor([4.0, 2.0, 1.0]), 1) == 2.0
    assert math.isnan(gap(torch.tensor([4.0, 2.0]), 2))  # no s_{k+1} past the rank
    spectra = module_spectra({"model.layers.0.mlp.up_proj.weight": (noise + signal).T,
                              "model.layers.1.mlp.up_proj.weight": noise.T}, k=3)
    assert [(m.module, m.signal_ranks, m.shape) for m in spectra] == [("up_proj", [3, 0], (384, 128))]


def test_reward_is_exact_match_up_to_end():
    assert reward("357", "357") == 1.0
    assert reward("357<eos>", "357") == 1.0
    assert reward("357<eos>12", "357") == 1.0  # text after the end token is not the answer
    assert reward("357\n9", "357") == 1.0
    assert reward(" 357 ", "357") == 1.0
    for wrong in ("3571", "35", "", "<eos>357", "35<bos>7", "358<eos>"):
        assert reward(wrong, "357") == 0.0, wrong


def test_records_are_trl_prompt_completion_rows():
    rows = records(make_problems(3, 0))
    assert set(rows[0]) == {"prompt", "completion", "answer"}
    assert rows[0]["prompt"].endswith("=") and rows[0]["completion"] == rows[0]["answer"]


def test_tokenizer_round_trip_and_save_load(tmp_path):
    tok = build_tokenizer()
    ids = tok("12+345=")["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == 8  # BOS + one token per character
    assert tok.decode(ids, skip_special_tokens=True) == "12+345="
    assert tok.decode(tok("4321", add_special_tokens=False)["input_ids"]) == "4321"
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id}) == 4
    tok.save_pretrained(str(tmp_path))
    back = load_tokenizer(tmp_path)
    assert back("999+1=")["input_ids"] == tok("999+1=")["input_ids"]
    assert (back.pad_token, back.eos_token, back.padding_side) == ("<pad>", "<eos>", "left")


def test_passthrough_chat_template_matches_plain_tokenisation():
    tok = build_tokenizer()
    chat = [{"role": "user", "content": "12+3="}, {"role": "assistant", "content": "15"}]
    ids = tok.apply_chat_template(chat, chat_template=PASSTHROUGH_CHAT_TEMPLATE, tokenize=False)
    assert tok(ids, add_special_tokens=False)["input_ids"] == tok("12+3=15")["input_ids"] + [tok.eos_token_id]


def test_model_sizes():
    student, teacher = n_params(build_model(STUDENT)), n_params(build_model(TEACHER))
    assert 0.5e6 < student < 1.5e6
    assert 1.5e6 < teacher < 5e6 and teacher > 2 * student
    with pytest.raises(GeometryError):
        ModelConfig(hidden=100, layers=2, heads=3, intermediate=300)


def test_batched_greedy_matches_one_by_one():
    # Left padding must not change a prompt's continuation (positions come from the attention mask).
    model, tok = build_model(ModelConfig(hidden=32, layers=2, heads=2, intermediate=64), seed=1), build_tokenizer()
    prompts = [p.prompt for p in make_problems(6, 0)]
    assert greedy_completions(model, tok, prompts) == [greedy_completions(model, tok, [p])[0] for p in prompts]


def test_batch_tensors_label_only_the_answer():
    tok = build_tokenizer()
    ids, mask, labels = batch_tensors(make_problems(4, 0), tok)
    assert ids.shape == mask.shape == labels.shape
    for i in range(4):
        answer = tok.decode([t for t in labels[i].tolist() if t != -100])
        assert answer.endswith("<eos>") and (labels[i] != -100).sum() == len(answer) - len("<eos>") + 1


def test_pretrain_smoke(tmp_path):
    torch.set_num_threads(2)
    cfg = PretrainConfig(steps=3, target=1.0, batch=8, warmup=1, eval_every=3, eval_size=8)
    res = pretrain("student", tmp_path, seed=0, cfg=cfg, log=lambda _: None)
    assert res.steps == 3 and res.params == n_params(build_model(STUDENT))
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in tmp_path.iterdir()
    }
    assert next(load_model(tmp_path).parameters()).dtype == torch.float32


def test_pretrain_phases_continue_the_count_and_checkpoints_are_saved_beside(tmp_path):
    """A second phase (``then``) continues training the same model on its own task with a fresh schedule, its
    checks numbered after the first phase's; a checkpoint is the model at its step, saved beside the result."""
    torch.set_num_threads(2)
    then = PretrainConfig(steps=2, target=None, task=POSTTRAIN_TASK, batch=8, warmup=1, eval_every=2, eval_size=8)
    cfg = PretrainConfig(steps=3, target=None, batch=8, warmup=1, eval_every=3, eval_size=8,
                         checkpoints=((2, "mid"),), then=then)
    res = pretrain("student", tmp_path / "student", seed=0, cfg=cfg, log=lambda _: None)
    assert res.steps == 5 and [c.step for c in res.curve] == [3, 5]
    one = pretrain("student", None, seed=0, cfg=replace(cfg, then=None, checkpoints=()), log=lambda _: None)
    assert one.curve == res.curve[:1]  # the first phase is the one-phase schedule, check for check
    mid, final = load_model(tmp_path / "mid").state_dict(), load_model(tmp_path / "student").state_dict()
    assert any(not torch.equal(mid[n], final[n]) for n in final)
    with pytest.raises(GeometryError, match="checkpoints must lie within"):
        PretrainConfig(steps=3, target=None, checkpoints=((4, "late"),))


def test_shipped_models_load_and_teacher_beats_student():
    """On the post-training task the student starts part-way and the teacher is well ahead of it (95.6% against
    53.0% on the demo's 1000 problems); on its own pretraining task the converged student is accurate. The
    less-trained base, the reference study's start, is further behind."""
    shifted, own = make_problems(100, seed=2024, cfg=POSTTRAIN_TASK), make_problems(100, seed=2024, cfg=PRETRAIN_TASK)
    acc = {}
    for kind in ("student", "teacher", "base"):
        assert (DATA / kind / "config.json").is_file(), f"data/{kind} missing: run `geometry lab pretrain`"
        acc[kind] = accuracy(load_model(DATA / kind), load_tokenizer(DATA / kind), shifted)
    assert 0.2 <= acc["student"] <= 0.7  # part-way: GRPO gets reward signal and has room to improve
    assert acc["teacher"] >= 0.9 and acc["teacher"] > acc["student"] + 0.3
    assert acc["base"] < acc["student"] - 0.1
    assert accuracy(load_model(DATA / "student"), load_tokenizer(DATA / "student"), own) >= 0.8


def test_load_model_names_missing_dir(tmp_path):
    with pytest.raises(GeometryError, match="config.json"):
        load_model(tmp_path)
