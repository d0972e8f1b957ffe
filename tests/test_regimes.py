"""The study's training runs, at a micro size on the shipped student and teacher: stores, results, the paper's
estimators (against plain references), the precision rule."""

from pathlib import Path

import pytest
import torch

from geometry.capture.store import read_manifest, read_snapshot, read_tracking
from geometry.errors import GeometryError
from geometry.lab.models import load_model
from geometry.lab.precision import bf16_spacing, geometric_mean_spacing, paper_spacing, rule_lr
from geometry.lab.regimes import (
    EVAL_SEED,
    RegimeConfig,
    learning_rates,
    load_student,
    measured_matrices,
    train_opd,
    train_opd_fullkl,
    train_rlvr,
    train_sft,
)
from geometry.lab.task import POSTTRAIN_TASK, accuracy, make_problems, reward
from geometry.lab.tokenizer import load_tokenizer
from geometry.lab.trainers import OPDTrainer, RLVRTrainer, _flat_groups

DATA = Path(__file__).resolve().parent.parent / "data"
STUDENT, TEACHER = DATA / "student", DATA / "teacher"
MICRO = RegimeConfig(steps=4, batch=2, generations=4, snapshot_every=2, lock_k=8, eval_problems=20)


def run(kind, out, cfg=MICRO, **kw):
    if kind == "sft":
        return train_sft(STUDENT, out, cfg, **kw)
    if kind == "rlvr":
        return train_rlvr(STUDENT, out, cfg, **kw)
    if kind == "fullkl":
        return train_opd_fullkl(STUDENT, TEACHER, out, cfg, **kw)
    return train_opd(STUDENT, TEACHER, out, cfg, **kw)


def test_config_checks_and_snapshot_default():
    assert RegimeConfig(steps=100).recorder_config().snapshot_every == 20  # 5 snapshots: 20%, ..., 100%
    assert RegimeConfig(steps=3).recorder_config().snapshot_every == 1
    rc = RegimeConfig(seed=3).recorder_config()
    assert (rc.lock_k, rc.seed, rc.track_every, rc.snapshot_dtype) == (16, 3, 1, "bfloat16")
    assert RegimeConfig.quick().steps < RegimeConfig().steps
    for bad in (dict(steps=0), dict(generations=1), dict(lr=0.0), dict(snapshot_every=0), dict(threads=0)):
        with pytest.raises(GeometryError):
            RegimeConfig(**bad)
    with pytest.raises(GeometryError, match="alpha"):
        train_opd(STUDENT, TEACHER, Path("unused"), MICRO, alpha=1.5)


# ---- the precision rule ----


def test_bf16_spacing_planted():
    w = torch.tensor([1.0, 0.75, 3.0, -0.015625, 1e-3])
    want = torch.tensor([2.0**-7, 2.0**-8, 2.0**-6, 2.0**-13, 2.0**-17])  # 1e-3 lies in [2^-10, 2^-9)
    assert torch.equal(bf16_spacing(w), want)
    x = torch.randn(1000)  # the spacing is the gap to the next bf16 value up (for positive entries)
    up = torch.nextafter(x.abs().bfloat16(), torch.tensor(float("inf"), dtype=torch.bfloat16)).float()
    assert torch.equal(bf16_spacing(x), up - x.abs().bfloat16().float())


def test_rule_lr_scales_with_the_weights_and_is_the_papers_at_the_papers_scale():
    """Weights twice as large have spacings twice as large: the rule doubles the lr. Entries drawn like the 8B
    estimate get the paper's 1e-6 (up to sampling)."""
    w = [torch.randn(64, 64, generator=torch.Generator().manual_seed(1)) * 0.02]
    assert rule_lr([2 * w[0]]) == pytest.approx(2 * rule_lr(w), rel=1e-12)
    assert rule_lr(w) == pytest.approx(1e-6, rel=0.05)
    assert geometric_mean_spacing(w) == pytest.approx(paper_spacing(), rel=0.05)
    lrs = learning_rates(RegimeConfig(), STUDENT)
    assert lrs["sft"] == pytest.approx(10 * lrs["opd"]) and lrs["rlvr"] == lrs["opd"]
    assert learning_rates(RegimeConfig(lr=3e-6), STUDENT)["sft"] == pytest.approx(3e-5)


def test_student_is_loaded_as_a_bf16_checkpoint():
    model, raw = load_student(STUDENT), load_model(STUDENT)
    for p, q in zip(model.parameters(), raw.parameters(), strict=True):
        assert p.dtype == torch.float32 and torch.equal(p, p.bfloat16().float())
        assert torch.equal(p, q.bfloat16().float())
    assert len(measured_matrices(model)) == 28


# ---- the runs ----


@pytest.mark.parametrize("kind", ["sft", "rlvr", "opd", "fullkl"])
def test_each_regime_records_a_store(tmp_path, kind):
    """Tracking at every step, bf16 snapshots every 2 steps and at the last over a bf16-exact base; the final
    snapshot has moved; accuracies on the fixed held-out problems; the trainer's folder is gone; threads restored."""
    threads = torch.get_num_threads()
    res = run(kind, tmp_path / "run", RegimeConfig(**{**MICRO.__dict__, "threads": 2}))
    assert torch.get_num_threads() == threads
    assert res.store == tmp_path / "run" and res.steps == 4 and res.seconds > 0
    assert res.lr == learning_rates(MICRO, STUDENT)["sft" if kind == "sft" else "opd"]
    man = read_manifest(res.store)
    assert man.steps == [2, 4] and man.tracking_steps == [1, 2, 3, 4] and man.final_step == 4
    base, final = read_snapshot(res.store, None), read_snapshot(res.store, 4)
    assert len(base) == 28  # 4 layers x (q, k, v, o, gate, up, down); embeddings and lm_head left out
    assert all(torch.equal(b, b.bfloat16().float()) for b in base.values())
    assert all(f.dtype == torch.bfloat16 for f in final.values())
    assert any(not torch.equal(base[n], final[n].float()) for n in base)
    assert all(t.u.shape[1] == 16 for t in read_tracking(res.store, 4).values())  # TRACK_K
    tok, student = load_tokenizer(STUDENT), load_student(STUDENT)
    assert res.acc_before == accuracy(student, tok, make_problems(20, EVAL_SEED, POSTTRAIN_TASK))
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
    assert any(not torch.equal(a4[n], b4[n]) for n in a4)


def test_same_seed_same_weights(tmp_path):
    """Repeatable: the same config gives bit-identical weights and accuracy; another seed does not."""
    a, b = run("opd", tmp_path / "a"), run("opd", tmp_path / "b")
    c = run("opd", tmp_path / "c", RegimeConfig(**{**MICRO.__dict__, "seed": 1}))
    wa, wb, wc = (read_snapshot(r.store, 4) for r in (a, b, c))
    assert all(torch.equal(wa[n], wb[n]) for n in wa) and a.acc_after == b.acc_after
    assert any(not torch.equal(wa[n], wc[n]) for n in wa)


def test_alpha_and_rollouts_change_the_update(tmp_path):
    """Same seed, same prompts: OPD (alpha 1), its mix with GRPO (alpha 0.05) and teacher rollouts take
    different first steps (float32 tracking state: ||D_1||_F and its top singular value). Four prompts of eight
    samples, so that some group's rewards vary: where none does, GRPO's advantage is zero and the mix is OPD's
    advantage scaled, which Adam's first step does not see."""
    cfg = RegimeConfig(**{**MICRO.__dict__, "steps": 1, "batch": 4, "generations": 8})
    runs = {k: run("opd", tmp_path / k, cfg, **kw) for k, kw in
            [("opd", {}), ("mix", dict(alpha=0.05)), ("off", dict(off_policy=True))]}
    s1 = {k: torch.stack([t.s[0] for t in read_tracking(r.store, 1).values()]) for k, r in runs.items()}
    for x, y in [("opd", "mix"), ("opd", "off"), ("mix", "off")]:
        assert not torch.allclose(s1[x], s1[y], rtol=1e-3), (x, y)


# ---- the estimators against plain references ----


def reference_logprobs(model, ids: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    """log p(y_t | y_<t) of the last n tokens, each sequence scored alone without its padding: (B, n)."""
    out = torch.zeros(ids.shape[0], n)
    with torch.no_grad():
        for i in range(ids.shape[0]):
            keep = mask[i].bool()
            row = ids[i][keep][None]  # (1, T) prompt (left padding dropped) + completion up to its mask end
            lp = torch.log_softmax(model(input_ids=row).logits[0, :-1].float(), -1).gather(-1, row[0, 1:, None])[:, 0]
            valid = int(mask[i, -n:].sum())  # completion tokens inside the mask (a prefix of the n)
            out[i, :valid] = lp[len(lp) - valid:] if valid else lp[:0]
    return out


class _Capture:
    """Keeps the scored generation batches a trainer hands to its loss."""

    def __init__(self, cls):
        outer = self
        self.batches = []

        class Captured(cls):
            def _generate_and_score_completions(self, inputs):
                out = super()._generate_and_score_completions(inputs)
                outer.batches.append({k: v.detach().clone() if torch.is_tensor(v) else v for k, v in out.items()})
                return out

        self.cls = Captured


def _opd_trainer(cls, tmp_path, **kw):
    from geometry.lab.regimes import _exact_reward, _grpo_args, _prompts

    tok = load_tokenizer(STUDENT)
    return cls(model=load_student(STUDENT), teacher_model=load_model(TEACHER), reward_funcs=_exact_reward(tok),
               args=_grpo_args(MICRO, tmp_path, 1e-6), train_dataset=_prompts(8, MICRO), processing_class=tok, **kw)


@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_opd_advantage_is_the_teachers_log_ratio(tmp_path, alpha):
    """OPDTrainer's per-token advantage equals alpha (log p_t - log p_s) + (1 - alpha) A_GRPO on the sampled
    tokens, log-probs recomputed by a plain unpadded forward of each sequence; zero outside the completion."""
    cap = _Capture(OPDTrainer)
    trainer = _opd_trainer(cap.cls, tmp_path, alpha=alpha)
    trainer.args.max_steps = 1
    trainer.train()
    out = cap.batches[0]
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    mask = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    n = out["completion_ids"].shape[1]
    cm = out["completion_mask"].float()
    lp_s = reference_logprobs(load_student(STUDENT), ids, mask, n)  # the weights before the step
    lp_t = reference_logprobs(load_model(TEACHER), ids, mask, n)
    rewards = torch.tensor(_rewards(out))
    g = rewards.view(-1, MICRO.generations)
    a_grpo = ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-4)).reshape(-1, 1)
    want = (alpha * (lp_t - lp_s) + (1 - alpha) * a_grpo) * cm
    assert out["advantages"].shape == cm.shape
    assert torch.allclose(out["advantages"], want, atol=1e-4)
    assert (out["advantages"][cm == 0] == 0).all() and (out["advantages"][cm == 1] != 0).any()


def _rewards(out) -> list[float]:
    """The 0/1 exact-answer reward of each row (lab.task.reward on the completion up to its EOS)."""
    tok = load_tokenizer(STUDENT)
    rows = []
    for p, pm, c, cm in zip(out["prompt_ids"], out["prompt_mask"], out["completion_ids"], out["completion_mask"],
                            strict=True):
        prompt = tok.decode(p[pm.bool()], skip_special_tokens=True).rstrip("=")
        op = "+" if "+" in prompt else "-"
        a, b = map(int, prompt.split(op))
        rows.append(reward(tok.decode(c[cm.bool()], skip_special_tokens=False), str(a + b if op == "+" else a - b)))
    return rows


def test_off_policy_samples_come_from_the_teacher(tmp_path):
    """With off_policy the completions are the teacher's: its greedy-accurate samples earn far more reward than
    the student's (84% vs 53% greedy-accurate on the post-training task), over the same prompts and seed."""
    rates = {}
    for off in (False, True):
        cap = _Capture(OPDTrainer)
        trainer = _opd_trainer(cap.cls, tmp_path / str(off), off_policy=off)
        trainer.args.max_steps = 2
        trainer.train()
        hits = [r for o in cap.batches for r in _rewards(o)]
        rates[off] = sum(hits) / len(hits)
    assert rates[True] > rates[False] + 0.2


def test_flat_groups_planted():
    adv = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.5, -0.5, 1.5, -1.5, 0.0, 0.0, 0.0, 0.0])
    assert _flat_groups(adv, 4).tolist() == [True] * 4 + [False] * 4 + [True] * 4


def test_rlvr_skips_steps_whose_groups_all_agree(tmp_path):
    """A reward that is always 1 leaves every group flat: no optimizer step moves any weight (momentum and
    weight decay included), and every step is counted as skipped."""
    from geometry.lab.regimes import _grpo_args, _prompts

    tok, model = load_tokenizer(STUDENT), load_student(STUDENT)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = RLVRTrainer(model=model, reward_funcs=lambda completions, **kw: [1.0] * len(completions),
                          args=_grpo_args(MICRO, tmp_path, 1e-3), train_dataset=_prompts(8, MICRO),
                          processing_class=tok)
    trainer.train()
    assert trainer.skipped_steps == MICRO.steps and trainer.skipped_groups == MICRO.steps * MICRO.batch
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_the_sft_budget_variant_is_opd_at_sfts_lr_in_groups_of_two(tmp_path):
    """The study's opd_sftlr: OPDTrainer at SFT's learning rate, the same sequences a step in groups of two."""
    from geometry.lab.study import plan, sft_budget

    cfg = sft_budget(MICRO, STUDENT)
    assert (cfg.batch, cfg.generations, cfg.sequences) == (MICRO.sequences // 2, 2, MICRO.sequences)
    res = plan(STUDENT, TEACHER, tmp_path, MICRO, ("opd_sftlr",))["opd_sftlr"]()
    assert res.lr == learning_rates(MICRO, STUDENT)["sft"] == 10 * learning_rates(MICRO, STUDENT)["opd"]
    assert (res.name, res.steps, res.store) == ("opd_sftlr", MICRO.steps, tmp_path / "opd_sftlr" / "s0")
    assert read_manifest(res.store).final_step == MICRO.steps
