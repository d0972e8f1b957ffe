"""The static logit lens (geometry.offline.lens, docs/metrics.md "Static logit lens") on planted updates of a tiny
Llama: a direction planted along a token's unembedding row must promote that token first, and every direction
must agree with a plain numpy reference."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from geometry.cli import main
from geometry.errors import GeometryError
from geometry.offline import lens
from geometry.offline.analyze import analyze
from geometry.offline.config import AnalysisConfig
from geometry.offline.lens import readout, writes_residual
from geometry.offline.outputs import load
from geometry.offline.sources import open_source

ROOT = Path(__file__).resolve().parents[1]
STUDENT = ROOT / "data" / "student"  # a real HF tokenizer of vocabulary 17
TINY = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=96, vocab_size=16, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=False)
PLANTED = "model.layers.1.mlp.down_proj.weight"  # (64, 96)
RANDOM = "model.layers.0.self_attn.o_proj.weight"  # (64, 64)
TOKEN = 9


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, dict]:
    """A tiny Llama whose final norm has a non-trivial scale gamma; its dir and state dict."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY))
    with torch.no_grad():
        model.model.norm.weight.uniform_(0.5, 2.0)
    d = tmp_path_factory.mktemp("lens") / "base"
    model.save_pretrained(d)
    return d, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _checkpoint(d: Path, base: tuple[Path, dict], tokenizer: bool, rand: bool = False) -> Path:
    """The base plus D = s u v^T on PLANTED, u = E[TOKEN] / gamma (normalised): gamma * u is along TOKEN's row of
    the unembedding. ``rand``: also a dense random update of RANDOM. ``tokenizer``: the student's tokenizer beside."""
    folder, state = base
    gen = torch.Generator().manual_seed(1)
    state = {k: v.clone() for k, v in state.items()}
    E, gamma = state["lm_head.weight"].double(), state["model.norm.weight"].double()
    u = E[TOKEN] / gamma
    v = torch.randn(96, generator=gen, dtype=torch.float64)
    state[PLANTED] += (0.05 * torch.outer(u / u.norm(), v / v.norm())).float()
    if rand:
        state[RANDOM] += 0.01 * torch.randn(64, 64, generator=gen)
    d.mkdir()
    save_file(state, str(d / "model.safetensors"))
    shutil.copy(folder / "config.json", d / "config.json")
    for name in ("tokenizer.json", "tokenizer_config.json") if tokenizer else ():
        shutil.copy(STUDENT / name, d / name)
    return d


def _by(directions, matrix: str) -> list:
    return sorted((d for d in directions if d.matrix == matrix), key=lambda d: d.direction)


def test_planted_token_promoted_first_and_decoded(base, tmp_path, one_thread):
    ckpt = _checkpoint(tmp_path / "ckpt", base, tokenizer=True)
    a = analyze(base[0], [ckpt], config=AnalysisConfig(lens=True, quick=True, device="cpu"))
    (d,) = _by(a.lens, PLANTED)  # rank one: the other directions are not resolved, so not listed
    state = base[1]
    E, gamma = state["lm_head.weight"].double(), state["model.norm.weight"].double()
    logits = E @ (gamma * (E[TOKEN] / gamma))
    tok = AutoTokenizer.from_pretrained(STUDENT, local_files_only=True)
    assert (d.direction, d.step, d.module, d.layer) == (0, 1, "down_proj", 1)
    assert d.singular_value == pytest.approx(0.05, rel=1e-5)
    assert d.promoted[0].id == TOKEN and d.suppressed[0].id == int(logits.argmin())
    assert [t.token for t in d.promoted] == [tok.decode([t.id]) for t in d.promoted]
    assert len(d.promoted) == len(d.suppressed) == 10
    assert {x.matrix for x in a.lens} == {PLANTED}  # unchanged matrices have no direction
    assert any("decoded by the tokenizer" in n for n in a.notes)


def _reference(D: np.ndarray, E: np.ndarray, gamma: np.ndarray, k: int, n: int):
    """The lens in plain numpy: top-k left singular vectors of D, scaled by gamma, through E, each signed so that
    its largest logit is the largest in magnitude; (s, promoted ids, their logits, suppressed ids) per direction."""
    U, S, _ = np.linalg.svd(D)
    out = []
    for i in range(k):
        logits = E @ (gamma * U[:, i])
        if logits.max() < -logits.min():
            logits = -logits
        order = np.argsort(-logits)
        out.append((S[i], order[:n], logits[order[:n]], np.argsort(logits)[:n]))
    return out


def test_every_direction_matches_numpy_reference_and_ids_without_tokenizer(base, tmp_path, one_thread):
    ckpt = _checkpoint(tmp_path / "ckpt", base, tokenizer=False, rand=True)
    cfg = AnalysisConfig(lens=True, quick=True, device="cpu", lens_top=4, lens_tokens=10, include=("o_proj",))
    a = analyze(base[0], [ckpt], config=cfg)
    assert {d.matrix for d in a.lens} == {RANDOM}  # o_proj only: down_proj was not selected
    state = base[1]
    D = (open_source(ckpt).read(RANDOM).double() - state[RANDOM].double()).numpy()
    ref = _reference(D, state["lm_head.weight"].double().numpy(), state["model.norm.weight"].double().numpy(), 4, 10)
    got = _by(a.lens, RANDOM)
    assert len(got) == 4
    for d, (s, ids, logits, low) in zip(got, ref, strict=True):
        assert d.singular_value == pytest.approx(s, rel=1e-9)
        assert [t.id for t in d.promoted] == list(ids) and [t.id for t in d.suppressed] == list(low)
        np.testing.assert_allclose([t.logit for t in d.promoted], logits, rtol=1e-4, atol=1e-7)
        assert all(t.token is None for t in d.promoted + d.suppressed)
    assert any("token ids (no tokenizer" in n for n in a.notes)


def test_gpt2_conv1d_reads_columns_through_a_centred_layernorm(tmp_path, one_thread):
    """GPT-2 stores its weights (in, out) and ties lm_head to wte: the right singular vectors, centred and scaled
    by ln_f's weight, through wte."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=16, n_positions=16))
    with torch.no_grad():
        model.transformer.ln_f.weight.uniform_(0.5, 2.0)
    model.save_pretrained(tmp_path / "base")
    name = "transformer.h.0.attn.c_proj.weight"  # square: only the orientation tells the sides apart
    saved = open_source(tmp_path / "base")
    state = {n: saved.read(n).clone() for n in saved.names()}  # wte only: lm_head is tied to it
    state[name] += 0.01 * torch.randn(32, 32, generator=torch.Generator().manual_seed(2))
    (tmp_path / "ckpt").mkdir()
    save_file(state, str(tmp_path / "ckpt" / "model.safetensors"))
    shutil.copy(tmp_path / "base" / "config.json", tmp_path / "ckpt" / "config.json")
    cfg = AnalysisConfig(lens=True, quick=True, device="cpu", include=("attn.c_proj",), lens_tokens=4)
    got = _by(analyze(tmp_path / "base", [tmp_path / "ckpt"], config=cfg).lens, name)
    E, gamma = state["transformer.wte.weight"].double().numpy(), state["transformer.ln_f.weight"].double().numpy()
    D = (state[name].double() - saved.read(name).double()).numpy()
    _, _, Vh = np.linalg.svd(D)
    assert "lm_head.weight" not in state and len(got) == 4
    for d in got:  # the reference: right singular vectors, centred, through gamma and E
        v = Vh[d.direction] - Vh[d.direction].mean()
        logits = E @ (gamma * v)
        logits = -logits if logits.max() < -logits.min() else logits
        assert [t.id for t in d.promoted] == list(np.argsort(-logits)[:4])
        np.testing.assert_allclose([t.logit for t in d.promoted], np.sort(logits)[::-1][:4], rtol=1e-4, atol=1e-7)


def test_cli_writes_lens_json_and_summary_section(base, tmp_path, one_thread, capsys):
    ckpt = _checkpoint(tmp_path / "ckpt", base, tokenizer=True)
    out = tmp_path / "out"
    assert main(["analyze", str(base[0]), str(ckpt), "-o", str(out), "--quick", "--lens", "--lens-top", "2",
                 "--lens-tokens", "3", "--device", "cpu", "--no-progress", "--no-figures"]) == 0
    doc = json.loads((out / "lens.json").read_text())
    (rec,) = [r for r in doc if r["matrix"] == PLANTED]
    assert rec["direction"] == 0 and rec["promoted"][0][:2] == [str(TOKEN - 4), TOKEN]  # the student's "5"
    assert len(rec["promoted"]) == 3
    md = (out / "summary.md").read_text()
    section = md[md.index("## Static logit lens"):md.index("## Notes")]
    assert PLANTED in section and "'5'" in section
    assert load(out).lens == load(out).lens and load(out).lens[0].promoted[0].id == TOKEN
    assert not (tmp_path / "plain").exists()
    assert main(["analyze", str(base[0]), str(ckpt), "-o", str(tmp_path / "plain"), "--quick", "--device", "cpu",
                 "--no-progress", "--no-figures"]) == 0
    assert not (tmp_path / "plain" / "lens.json").exists()  # opt-in


def test_extremes_a_band_at_a_time_equal_whole(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    E, X = torch.randn(1000, 8, generator=gen).bfloat16(), torch.randn(8, 5, generator=gen, dtype=torch.float64)
    monkeypatch.setattr(lens, "BAND_BYTES", 4 * 8 * 37)  # bands of 37 rows, the last one shorter
    top_v, top_i, bot_v, bot_i = lens.extremes(E, X, 40)
    logits = E.float() @ X.float()  # (V, c)
    whole = logits.topk(40, dim=0), logits.topk(40, dim=0, largest=False)
    for (v, i), (wv, wi) in zip(((top_v, top_i), (bot_v, bot_i)), whole, strict=True):
        assert torch.equal(i, wi.T)
        torch.testing.assert_close(v, wv.T)


def test_residual_writers_by_name():
    writers = ["model.layers.0.self_attn.o_proj.weight", "model.layers.0.mlp.down_proj.weight",
               "model.layers.0.mlp.experts.3.down_proj.weight", "model.layers.0.block_sparse_moe.experts.3.w2.weight",
               "transformer.h.0.attn.c_proj.weight", "transformer.h.0.mlp.c_proj.weight",
               "model.layers.0.self_attn.dense.weight", "gpt_neox.layers.0.mlp.dense_4h_to_h.weight",
               "model.decoder.layers.0.fc2.weight", "model.layers.0.mlp.shared_expert.down_proj.weight"]
    others = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.gate_proj.weight",
              "model.layers.0.block_sparse_moe.experts.3.w1.weight", "bert.layers.0.intermediate.dense.weight",
              "transformer.h.0.attn.c_attn.weight", "lm_head.weight", "model.layers.0.mlp.gate.weight"]
    assert all(map(writes_residual, writers)) and not any(map(writes_residual, others))


def _source(tmp_path: Path, tensors: dict, config: dict):
    tmp_path.mkdir()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config))
    return open_source(tmp_path)


def test_readout_tied_gemma_and_layernorm(tmp_path):
    E, w = torch.randn(16, 8), torch.rand(8)
    tied = readout(_source(tmp_path / "gemma", {"model.embed_tokens.weight": E, "model.norm.weight": w,
                                                "model.layers.0.input_layernorm.weight": w + 5},
                           {"model_type": "gemma", "rms_norm_eps": 1e-6}))
    assert torch.equal(tied.unembedding, E) and not tied.center
    torch.testing.assert_close(tied.gamma, 1.0 + w.double())  # Gemma stores gamma - 1
    gpt2 = readout(_source(tmp_path / "gpt2", {"transformer.wte.weight": E, "transformer.ln_f.weight": w,
                                               "transformer.ln_f.bias": w.clone()}, {"model_type": "gpt2"}))
    assert gpt2.center and torch.equal(gpt2.gamma, w.double())
    bare = readout(_source(tmp_path / "bare", {"lm_head.weight": E}, {}))
    assert torch.equal(bare.gamma, torch.ones(8, dtype=torch.float64)) and "no final norm" in bare.names
    with pytest.raises(GeometryError, match="no unembedding"):
        readout(_source(tmp_path / "none", {"model.norm.weight": w}, {}))
