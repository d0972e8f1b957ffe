"""The Trainer callbacks on real (tiny) transformers.Trainer runs: recording, and gradient projection."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from geometry.capture.callbacks import GeometryCallback, GradientProjectionCallback
from geometry.capture.recorder import RecorderConfig
from geometry.capture.store import read_manifest, read_snapshot, read_tracking
from geometry.capture.trajectory import tracking_table
from geometry.errors import GeometryError
from geometry.subspaces import subspace_sim

K = 16


pytestmark = pytest.mark.usefixtures("one_thread")


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=256, seq=16, vocab=96, seed=0):
        g = torch.Generator().manual_seed(seed)
        # a learnable pattern: each sequence counts up from a random start, mod vocab
        start = torch.randint(0, vocab, (n, 1), generator=g)
        self.x = (start + torch.arange(seq)) % vocab

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def train(tmp_path, model, callbacks, steps=30, **kw):
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=steps, per_device_train_batch_size=8,
                             learning_rate=kw.pop("learning_rate", 3e-3), use_cpu=True, report_to=[],
                             save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0, **kw)
    Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=callbacks).train()


def exact(d):
    U, S, Vh = torch.linalg.svd(d.double(), full_matrices=False)
    return U[:, :K], S, Vh[:K].mT


def test_geometry_callback_tracking_matches_exact_svd(tmp_path):
    """A 30-step AdamW run of a tiny Llama under transformers.Trainer: at the snapshot steps the tracked
    Sim_K and stable rank agree with the exact SVD of the stored checkpoints (SPEC tolerances), and the
    tracked locking curve matches the exact one."""
    model = tiny_llama()
    run = tmp_path / "geometry"
    cb = GeometryCallback(run, RecorderConfig(snapshot_every=10))
    train(tmp_path, model, [cb])
    man = read_manifest(run)
    assert man.steps == [10, 20, 30] and man.tracking_steps == list(range(1, 31)) and man.final_step == 30

    base = read_snapshot(run, None)
    final = {n: p.detach() for n, p in model.named_parameters()}
    exact_v = {}
    for t in man.steps:
        snap, st = read_snapshot(run, t), read_tracking(run, t)
        for name, w in snap.items():
            if t == 30:
                assert torch.equal(w, final[name])  # the stored final step is the trained model
            U, S, V = exact(w - base[name])
            exact_v[t, name] = V
            tr = st[name]
            assert subspace_sim(tr.u, U) >= 0.98 and subspace_sim(tr.v, V) >= 0.98, (t, name)
            assert tr.fro**2 / tr.s[0] ** 2 == pytest.approx(float(S.square().sum() / S[0] ** 2), rel=0.02)
    curves = tracking_table(run)
    for (t, name), V in exact_v.items():
        got = curves.where(step=t, matrix=name, metric="track_sim_final_v").values()[0]
        assert got == pytest.approx(float(subspace_sim(V, exact_v[30, name])), abs=0.02)
    stats = cb.stats
    assert stats.fallbacks == 0
    assert stats.iterations / (stats.tracked_steps * len(base)) < 3  # about one iteration per step once warm


def test_store_must_not_be_the_trainer_output_dir(tmp_path):
    with pytest.raises(GeometryError, match="output_dir"):
        train(tmp_path, tiny_llama(), [GeometryCallback(tmp_path / "trainer")], steps=2)


@pytest.mark.parametrize("side", ["right", "left", "both"])
def test_gradient_projection_confines_sgd_updates(tmp_path, side):
    """SPEC item 9 with plain SGD, no weight decay: after the start step t0 the update D_T - D_t0 lies in
    the fixed top-K subspace(s) of D_t0, so its component outside them is zero (float64 rounding)."""
    model = tiny_llama().double()  # float32 rounding of W_t itself would leave ~1e-7 * ||W|| outside
    run = tmp_path / "geometry"
    proj = GradientProjectionCallback(start_frac=0.25, lock_k=K, side=side)
    rec = GeometryCallback(run, RecorderConfig(snapshot_every=5, track_every=0))
    train(tmp_path, model, [proj, rec], steps=20, optim="sgd", learning_rate=0.1, weight_decay=0.0)
    assert proj.start_step == 5
    w0, w5, wT = read_snapshot(run, None), read_snapshot(run, 5), read_snapshot(run, 20)
    for name in w0:
        U, _, V = exact(w5[name] - w0[name])
        later = (wT[name] - w5[name]).double()  # (m, n) D_T - D_t0
        outside = later
        if side in ("right", "both"):
            outside = outside - outside @ V @ V.T
        if side in ("left", "both"):
            outside = outside - U @ (U.T @ outside)
        assert later.norm() > 0
        assert outside.norm() / later.norm() < 1e-9, name


def test_without_projection_the_update_leaves_the_subspace(tmp_path):
    """The control for the test above: unconstrained SGD moves outside span(V_K) of D_t0."""
    model = tiny_llama()
    run = tmp_path / "geometry"
    train(tmp_path, model, [GeometryCallback(run, RecorderConfig(snapshot_every=5, track_every=0))], steps=20,
          optim="sgd", learning_rate=0.1, weight_decay=0.0)
    w0, w5, wT = read_snapshot(run, None), read_snapshot(run, 5), read_snapshot(run, 20)
    name = "model.layers.0.mlp.up_proj.weight"
    _, _, V = exact(w5[name] - w0[name])
    later = (wT[name] - w5[name]).double()
    assert (later - later @ V @ V.T).norm() / later.norm() > 0.05


def test_the_callback_adds_no_line_to_the_trainers_output(tmp_path, capfd):
    """Recording every step (and snapshots) prints nothing: the trainer's output has as many lines with the
    callback as without it."""
    train(tmp_path / "warm", tiny_llama(), [], steps=1)  # the one-time warnings of the first Trainer
    capfd.readouterr()
    train(tmp_path / "plain", tiny_llama(), [], steps=8)
    plain = capfd.readouterr()
    train(tmp_path / "recorded", tiny_llama(), [GeometryCallback(tmp_path / "geometry",
                                                                 RecorderConfig(snapshot_every=2))], steps=8)
    recorded = capfd.readouterr()
    assert read_manifest(tmp_path / "geometry").tracking_steps == list(range(1, 9))
    assert len(recorded.out.splitlines()) == len(plain.out.splitlines())
    assert len(recorded.err.splitlines()) == len(plain.err.splitlines()), recorded.err
