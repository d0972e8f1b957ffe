"""The study's training runs, at a micro size on the shipped student and teacher: stores, results, controls."""

from pathlib import Path

import pytest
import torch

from geometry.capture.store import read_manifest, read_snapshot, read_tracking
from geometry.errors import GeometryError
from geometry.lab.models import ModelConfig, build_model, load_model
from geometry.lab.regimes import (
    EVAL_SEED,
    RegimeConfig,
    group_advantages,
    mixed_loss,
    sample,
    token_logprobs,
    train_opd,
    train_opd_loop,
    train_rlvr,
    train_sft,
)
from geometry.lab.task import accuracy, make_problems, reward
from geometry.lab.tokenizer import build_tokenizer, load_tokenizer

DATA = Path(__file__).resolve().parent.parent / "data"
STUDENT, TEACHER = DATA / "student", DATA / "teacher"
MICRO = RegimeConfig(steps=4, batch=2, generations=4, snapshot_every=2, lock_k=8, eval_problems=20)


def run(kind, out, cfg=MICRO, **kw):
    if kind == "sft":
        return train_sft(STUDENT, out, cfg, **kw)
    if kind == "rlvr":
        return train_rlvr(STUDENT, out, cfg, **kw)
    if kind == "opd":
        return train_opd(STUDENT, TEACHER, out, cfg, **kw)
    return train_opd_loop(STUDENT, TEACHER, out, cfg, name=kind, **kw)


def test_config_checks_and_snapshot_default():
    assert RegimeConfig(steps=100).recorder_config().snapshot_every == 20  # 5 snapshots: 20%, ..., 100%
    assert RegimeConfig(steps=3).recorder_config().snapshot_every == 1
    rc = RegimeConfig(lock_k=4, seed=3).recorder_config()
    assert (rc.lock_k, rc.seed, rc.track_every) == (4, 3, 1)
    assert RegimeConfig.quick().steps < RegimeConfig.default().steps
    for bad in (dict(steps=0), dict(generations=1), dict(lr=0.0), dict(snapshot_every=0), dict(threads=0)):
        with pytest.raises(GeometryError):
            RegimeConfig(**bad)
    with pytest.raises(GeometryError, match="alpha"):
        train_opd_loop(STUDENT, TEACHER, Path("unused"), MICRO, name="x", alpha=1.5)


@pytest.mark.parametrize("kind", ["sft", "rlvr", "opd", "loop"])
def test_each_regime_records_a_store(tmp_path, kind):
    """Tracking at every step, snapshots every 2 steps and at the last; the final snapshot has moved;
    accuracies are on the fixed held-out problems; the trainer's folder is gone; threads are restored."""
    threads = torch.get_num_threads()
    res = run(kind, tmp_path / "run", RegimeConfig(**{**MICRO.__dict__, "threads": 2}))
    assert torch.get_num_threads() == threads
    assert res.store == tmp_path / "run" and res.steps == 4 and res.seconds > 0
    man = read_manifest(res.store)
    assert man.steps == [2, 4] and man.tracking_steps == [1, 2, 3, 4] and man.final_step == 4
    base, final = read_snapshot(res.store, None), read_snapshot(res.store, 4)
    assert len(base) == 28  # 4 layers x (q, k, v, o, gate, up, down); embeddings and lm_head left out
    assert any(not torch.equal(base[n], final[n]) for n in base)
    assert all(t.u.shape[1] == 8 for t in read_tracking(res.store, 4).values())  # K
    tok, student = load_tokenizer(STUDENT), load_model(STUDENT)
    assert res.acc_before == accuracy(student, tok, make_problems(20, EVAL_SEED))
    assert 0.0 <= res.acc_after <= 1.0
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


@pytest.mark.parametrize("kind", ["sft", "opd"])
def test_projection_is_attached_from_20_percent(tmp_path, kind):
    """Projection starts after step round(0.2 * 4) = 1: the first step is the plain run's, later ones differ."""
    cfg = RegimeConfig(**{**MICRO.__dict__, "snapshot_every": 1})
    plain, proj = run(kind, tmp_path / "plain", cfg), run(kind, tmp_path / "proj", cfg, projection=True)
    a1, b1 = read_snapshot(plain.store, 1), read_snapshot(proj.store, 1)
    a4, b4 = read_snapshot(plain.store, 4), read_snapshot(proj.store, 4)
    assert all(torch.equal(a1[n], b1[n]) for n in a1)
    assert all(not torch.equal(a4[n], b4[n]) for n in a4)


def test_same_seed_same_weights(tmp_path):
    """Repeatable: the same config gives bit-identical weights and accuracy (GRPO: TRL's own sampling);
    another seed does not."""
    a, b = run("rlvr", tmp_path / "a"), run("rlvr", tmp_path / "b")
    c = run("rlvr", tmp_path / "c", RegimeConfig(**{**MICRO.__dict__, "seed": 1}))
    wa, wb, wc = (read_snapshot(r.store, 4) for r in (a, b, c))
    assert all(torch.equal(wa[n], wb[n]) for n in wa) and a.acc_after == b.acc_after
    assert any(not torch.equal(wa[n], wc[n]) for n in wa)
    d, e = run("loop", tmp_path / "d", alpha=0.5), run("loop", tmp_path / "e", alpha=0.5)
    wd, we = read_snapshot(d.store, 4), read_snapshot(e.store, 4)
    assert all(torch.equal(wd[n], we[n]) for n in wd)


def test_loop_alpha_and_rollouts_change_the_update(tmp_path):
    """Same seed, same first samples: alpha=1 (OPD) and alpha=0 (RLVR) take different first steps, and
    off-policy (teacher) rollouts a third."""
    cfg = RegimeConfig(**{**MICRO.__dict__, "steps": 1})
    runs = {k: run("loop", tmp_path / k, cfg, **kw) for k, kw in
            [("opd", dict(alpha=1.0)), ("rlvr", dict(alpha=0.0)), ("off", dict(off_policy=True))]}
    base = read_snapshot(runs["opd"].store, None)
    d = {k: {n: w - base[n] for n, w in read_snapshot(r.store, 1).items()} for k, r in runs.items()}
    for x, y in [("opd", "rlvr"), ("opd", "off"), ("rlvr", "off")]:
        diff = sum((d[x][n] - d[y][n]).norm() ** 2 for n in base) ** 0.5
        assert diff > 0.1 * sum(d[x][n].norm() ** 2 for n in base) ** 0.5, (x, y)


# ---- the loop's parts against plain references ----


def test_group_advantages_planted():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    adv = group_advantages(r, 4)
    std = torch.tensor([1.0, 0, 0, 0]).std()  # unbiased, as TRL: 0.5
    assert torch.allclose(adv[:4], (torch.tensor([1.0, 0, 0, 0]) - 0.25) / (std + 1e-4))
    assert torch.equal(adv[4:], torch.zeros(4))  # an all-correct group carries no signal


def test_sampling_is_seeded_and_stops_at_eos():
    model, tok = build_model(ModelConfig(hidden=32, layers=2, heads=2, intermediate=64), seed=1), build_tokenizer()
    prompts = [p.prompt for p in make_problems(6, 0)]
    a = sample(model, tok, prompts, 6, torch.Generator().manual_seed(5))
    b = sample(model, tok, prompts, 6, torch.Generator().manual_seed(5))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    ids, mask, cmask = a
    comp = ids[:, -cmask.shape[1]:]
    for row, m in zip(comp.tolist(), cmask.tolist(), strict=True):
        n = sum(m)
        assert m == [1] * n + [0] * (len(m) - n)  # valid tokens are a prefix ...
        if n < len(m):  # ... ending at the first EOS, padding after it
            assert row[n - 1] == tok.eos_token_id and tok.eos_token_id not in row[:n - 1]
            assert set(row[n:]) == {tok.pad_token_id}


def test_token_logprobs_match_unpadded_forward():
    """Left padding with explicit positions scores each sequence as the model does alone."""
    model, tok = load_model(STUDENT), load_tokenizer(STUDENT)
    prompts = [p.prompt for p in make_problems(5, 1)]
    ids, mask, cmask = sample(model, tok, prompts, 6, torch.Generator().manual_seed(0))
    C = cmask.shape[1]
    with torch.no_grad():
        lp = token_logprobs(model, ids, mask, C)  # (N, C)
        for i in range(len(prompts)):
            row = ids[i][mask[i].bool()][None]  # (1, T) the sequence without padding
            n = int(cmask[i].sum())
            ref = torch.log_softmax(model(input_ids=row).logits[0, :-1].float(), -1)
            ref = ref.gather(-1, row[0, 1:, None]).squeeze(-1)[-n:]  # its completion tokens
            assert torch.allclose(lp[i, :n], ref, atol=1e-5)


@pytest.mark.parametrize("off_policy", [False, True])
def test_mixed_loss_matches_reference(off_policy):
    """mixed_loss against a plain recomputation: rollouts from the student or (off-policy) the teacher,
    A = alpha * -(lp_s - lp_t) + (1 - alpha) * GRPO advantage, loss = -mean_valid(A * lp_s)."""
    tok, student, teacher = load_tokenizer(STUDENT), load_model(STUDENT), load_model(TEACHER)
    problems, cfg, alpha = make_problems(3, 2), RegimeConfig(generations=4), 0.3
    got = mixed_loss(student, teacher, tok, problems, cfg, alpha, off_policy, torch.Generator().manual_seed(9))
    prompts = [p.prompt for p in problems for _ in range(4)]
    ids, mask, cmask = sample(teacher if off_policy else student, tok, prompts, 6, torch.Generator().manual_seed(9))
    C = cmask.shape[1]
    with torch.no_grad():
        lp_s, lp_t = token_logprobs(student, ids, mask, C), token_logprobs(teacher, ids, mask, C)
    r = torch.tensor([reward(tok.decode(ids[i, -C:].tolist(), skip_special_tokens=False), problems[i // 4].answer)
                      for i in range(len(prompts))])
    g = r.view(3, 4)
    a_rlvr = ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-4)).reshape(-1, 1)
    adv = alpha * (lp_t - lp_s) + (1 - alpha) * a_rlvr
    want = -(adv * lp_s * cmask).sum() / cmask.sum()
    assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-7)
    other = mixed_loss(student, teacher, tok, problems, cfg, alpha, not off_policy, torch.Generator().manual_seed(9))
    assert other.item() != pytest.approx(got.item(), rel=1e-3)  # the other rollouts: another loss
