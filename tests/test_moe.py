"""Mixture-of-experts models: every expert and router measured, named as the model's checkpoints name them.

Tiny Qwen3-MoE, Mixtral, OLMoE and gpt-oss models built from transformers configs are trained by a real
transformers.Trainer with the GeometryCallback; the store is read back against the live experts bit for
bit, and an offline analysis of the same weights saved per expert (save_pretrained) and stacked (the
in-memory layout, gpt-oss's own layout) gives the same rows.
"""

import json
import warnings

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainingArguments

from geometry import experts
from geometry.capture.callbacks import GeometryCallback
from geometry.capture.matrices import matrices_of
from geometry.capture.recorder import Recorder, RecorderConfig
from geometry.capture.store import read_manifest, read_snapshot, read_tracking
from geometry.offline.analyze import analyze
from geometry.offline.config import AnalysisConfig
from geometry.offline.sources import open_source
from geometry.table import Table

pytestmark = pytest.mark.usefixtures("one_thread")

E, H, I = 4, 32, 16  # experts, hidden size, expert intermediate size
COMMON = dict(hidden_size=H, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
              num_experts_per_tok=2, max_position_embeddings=64)
CONFIGS = {
    "qwen3_moe": dict(COMMON, intermediate_size=64, moe_intermediate_size=I, num_experts=E, head_dim=8),
    "mixtral": dict(COMMON, intermediate_size=I, num_local_experts=E),
    "olmoe": dict(COMMON, intermediate_size=I, num_experts=E),
    "gpt_oss": dict(COMMON, intermediate_size=I, num_local_experts=E, head_dim=8,
                    layer_types=["sliding_attention", "full_attention"]),
}
# per-expert names as each model's save_pretrained writes them (gpt-oss keeps its experts stacked)
EXPERT_NAMES = {
    "qwen3_moe": ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight",
                  "mlp.experts.{e}.down_proj.weight", "mlp.gate.weight"),
    "mixtral": ("block_sparse_moe.experts.{e}.w1.weight", "block_sparse_moe.experts.{e}.w3.weight",
                "block_sparse_moe.experts.{e}.w2.weight", "block_sparse_moe.gate.weight"),
    "olmoe": ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight",
              "mlp.experts.{e}.down_proj.weight", "mlp.gate.weight"),
    "gpt_oss": ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight",
                "mlp.experts.{e}.down_proj.weight", "mlp.router.weight"),
}


def tiny(model_type, seed=0):
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(model_type, **CONFIGS[model_type])
    return AutoModelForCausalLM.from_config(cfg)


def expected_matrices(model_type):
    gate, up, down, router = EXPERT_NAMES[model_type]
    names = set()
    for layer in range(2):
        p = f"model.layers.{layer}."
        names |= {f"{p}self_attn.{m}_proj.weight" for m in "qkvo"}
        names.add(p + router)
        names |= {p + t.format(e=e) for e in range(E) for t in (gate, up, down)}
    return names


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=64, seq=12, vocab=64):
        start = torch.randint(0, vocab, (n, 1), generator=torch.Generator().manual_seed(0))
        self.x = (start + torch.arange(seq)) % vocab

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def train(tmp_path, model, callbacks, steps=6):
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=steps, per_device_train_batch_size=8,
                             learning_rate=1e-2, use_cpu=True, report_to=[], save_strategy="no",
                             logging_strategy="no", disable_tqdm=True, seed=0)
    Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=callbacks).train()


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_callback_records_every_expert_and_router_bit_for_bit(tmp_path, model_type):
    """Every expert's gate/up/down and every router is recorded and tracked under its checkpoint name; the
    store's last snapshot equals the live experts (oriented out x in) bit for bit."""
    model = tiny(model_type)
    run = tmp_path / "geometry"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # attention + experts + routers: no coverage warning
        cb = GeometryCallback(run, RecorderConfig(snapshot_every=3))
        train(tmp_path, model, [cb])
    manifest = read_manifest(run)
    final = manifest.steps[-1]
    snap = read_snapshot(run, final)
    assert set(snap) == expected_matrices(model_type)
    live = matrices_of(model)
    for name, w in live.gather(list(snap)):
        assert torch.equal(snap[name], w.detach().cpu()), name
    tracked = read_tracking(run, manifest.tracking_steps[-1])
    assert set(tracked) == set(snap)
    gate, _, down, _ = EXPERT_NAMES[model_type]
    u = tracked["model.layers.0." + down.format(e=1)].u
    assert u.shape[0] == H  # down projection: out = hidden, left vectors of length H (oriented as a Linear)
    assert tracked["model.layers.0." + gate.format(e=1)].v.shape[0] == H


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])
def test_callback_and_offline_analysis_of_the_saved_model_give_the_same_rows(tmp_path, model_type):
    """A run recorded live and the same weights saved with save_pretrained (per expert for Qwen3-MoE,
    gpt-oss's stacked [E, in, out] with interleaved gate/up) and stacked in the in-memory layout give the
    same rows, bit for bit."""
    model = tiny(model_type)
    model.save_pretrained(tmp_path / "base")
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    run = tmp_path / "geometry"
    train(tmp_path, model, [GeometryCallback(run, RecorderConfig(snapshot_every=0, track_every=0))])
    model.save_pretrained(tmp_path / "tuned")  # the layout save_pretrained writes
    stacked = tmp_path / "stacked"  # the in-memory layout saved as it is
    stacked.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"},
              stacked / "model.safetensors")
    (stacked / "config.json").write_text(model.config.to_json_string())
    base_stacked = tmp_path / "base_stacked"
    base_stacked.mkdir()
    save_file({k: v.contiguous() for k, v in base_state.items() if k != "lm_head.weight"},
              base_stacked / "model.safetensors")
    (base_stacked / "config.json").write_text(model.config.to_json_string())

    cfg = AnalysisConfig(quick=True)

    def rows(base, tuned):
        return sorted((r.matrix, r.layer, r.module, r.metric, "nan" if r.value != r.value else r.value)
                      for r in analyze(base, [tuned], config=cfg) if r.step)

    saved = rows(tmp_path / "base", tmp_path / "tuned")
    assert {r[0] for r in saved} == expected_matrices(model_type)
    assert rows(base_stacked, stacked) == saved
    assert rows(run / "base", run) == saved  # the recorder's store: its base and its final snapshot


def test_stacked_and_per_expert_layouts_read_the_same_matrices(tmp_path):
    """An expert read from a stacked tensor is the matrix the per-expert checkpoint holds, for every layout
    transformers' conversion mapping or gpt-oss's own rule describes."""
    for model_type in CONFIGS:
        model = tiny(model_type)
        model.save_pretrained(tmp_path / model_type)
        saved = open_source(tmp_path / model_type)
        live = matrices_of(model)
        for name, w in live.gather([n for n in live.parts if n in saved]):
            assert torch.equal(saved.read(name), w.detach()), name
        assert set(live.parts) <= set(saved.names())


def test_coverage_counts_what_is_measured_and_left_out(tmp_path):
    """Attention alone of a MoE model is under half of its non-embedding parameters: the recorder says so at its
    start, with what was left out by kind."""
    model = tiny("qwen3_moe")
    with pytest.warns(UserWarning, match=r"measured [\d,]+ of [\d,]+ parameters .*left out: .*others"):
        rec = Recorder(model, tmp_path / "g", RecorderConfig(include=("self_attn",)))
    rec.close()
    cov = rec.coverage
    assert cov.total == sum(p.numel() for p in model.parameters())
    assert cov.measured == sum(p.numel() for n, p in model.named_parameters() if "self_attn" in n and "norm" not in n)
    assert cov.left_out["embeddings"] == (2, 2 * 64 * H)  # embed_tokens and lm_head
    assert cov.left_out["norms"][0] == 2 * 4 + 1  # per layer: q/k norms, two layer norms; the final norm
    assert cov.left_out["others"][0] == 2 * 3  # per layer: stacked gate_up and down, the router
    assert cov.share_non_embedding() < 0.5
    full = Recorder(tiny("qwen3_moe"), tmp_path / "h", RecorderConfig())
    full.close()
    assert full.coverage.left_out["others"] == (0, 0) and full.coverage.share_non_embedding() > 0.9


def test_stacked_experts_named_by_transformers_mapping():
    parts, notes = experts.split({"model.layers.0.mlp.experts.gate_up_proj": (E, 2 * I, H),
                                  "model.layers.0.mlp.experts.down_proj": (E, H, I)}, model_type="mixtral")
    assert not notes
    names = [p.name for p in parts["model.layers.0.mlp.experts.gate_up_proj"]]
    assert names[:2] == ["model.layers.0.block_sparse_moe.experts.0.w1.weight",
                         "model.layers.0.block_sparse_moe.experts.0.w3.weight"]
    parts, notes = experts.split({"x.experts.gate_up_proj": (E, 2 * I, H)}, model_type=None)
    assert notes and parts["x.experts.gate_up_proj"][1].name == "x.experts.0.up_proj.weight"


def test_analyze_a_saved_gpt_oss_measures_every_expert_and_says_what_it_left_out(tmp_path, capsys):
    """`geometry analyze` on a gpt-oss saved with save_pretrained (experts stacked [E, in, out]): all 2 x (4 + 1
    + 4 x 3) matrices, the share of the parameters measured in summary.json and summary.md, a layer x expert
    view in summary.md and the report; with attention alone, a warning on stderr."""
    from geometry.cli import main

    model = tiny("gpt_oss")
    model.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "tuned")
    assert main(["analyze", str(tmp_path / "base"), str(tmp_path / "tuned"), "-o", str(tmp_path / "out"),
                 "--quick"]) == 0
    err = capsys.readouterr().err
    assert "warning" not in err
    doc = json.loads((tmp_path / "out" / "summary.json").read_text())
    cov = next(iter(doc["runs"].values()))["coverage"]
    assert cov["total_parameters"] == sum(p.numel() for p in model.parameters())
    assert cov["left_out"]["embeddings"]["tensors"] == 2 and cov["left_out"]["others"]["tensors"] == 2 * 1  # sinks
    assert cov["left_out"]["biases"]["tensors"] == 2 * (4 + 1 + 2)  # q/k/v/o, router, experts' two biases
    table = Table.from_csv(tmp_path / "out" / "metrics.csv")
    assert set(table.unique("matrix")) == expected_matrices("gpt_oss")
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "## Experts" in md and "Moved most (relative norm): layer" in md and "Routers:" in md
    assert "measured" in md and "left out: embeddings 2 tensors" in md
    figures = {p.name for p in (tmp_path / "out" / "figures").iterdir()}
    assert {"experts_sparsity_bf16_run.png", "experts_rel_norm_run.png"} <= figures

    assert main(["analyze", str(tmp_path / "base"), str(tmp_path / "tuned"), "-o", str(tmp_path / "attn"),
                 "--quick", "--include", "self_attn"]) == 0
    assert "warning: run: under half of the non-embedding parameters measured" in capsys.readouterr().err
