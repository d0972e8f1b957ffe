"""Plots take the analysis table, honour ax=, return the Figure, and tell runs apart."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from geometry import plots  # noqa: E402
from geometry.table import Row, Table  # noqa: E402


@pytest.fixture
def table():
    rows = []
    for run, drift in (("sft", 1.0), ("opd", 0.1)):
        for step in (10, 20, 30):
            for layer in range(2):
                name = f"model.layers.{layer}.mlp.up_proj.weight"
                vals = {"sim_final_v": min(1.0, step / 30 + drift / 10), "stable_rank": step * drift,
                        "sparsity_bf16": 0.5 * drift, "mask_overlap_principal": 0.3, "mask_overlap_lowmag": 0.6,
                        "n_params": 100.0}
                rows += [Row(run, step, name, layer, "up_proj", m, v) for m, v in vals.items()]
    return Table(rows)


def test_functions_return_their_figure_and_use_the_given_axes(table):
    fig, axes = plt.subplots(1, 3)
    assert plots.locking(table, axes[0]) is fig
    assert plots.metric_over_steps(table, "stable_rank", axes[1]) is fig
    assert plots.localisation(table, axes[2]) is fig
    labels = [t.get_text() for t in axes[0].get_legend().get_texts()]
    assert labels == ["sft", "opd"]
    lines = axes[1].get_lines()
    np.testing.assert_allclose(lines[0].get_ydata(), [10, 20, 30])  # the mean over matrices, per step
    plt.close(fig)


def test_runs_have_distinct_colours(table):
    fig = plots.metric_over_steps(table, "stable_rank")
    colours = [line.get_color() for line in fig.axes[0].get_lines()]
    assert len(set(colours)) == 2
    plt.close(fig)


def test_angle_curves_and_spectra_from_curves():
    curves = {("sft", 0, "w"): np.array([3.0, 2.0, 1.0]), ("sft", 5, "w"): np.array([3.3, 2.1, 1.0])}
    fig = plots.spectra(curves, "w")
    y = fig.axes[0].get_lines()[0].get_ydata()
    np.testing.assert_allclose(y[:2], [0.1, 0.05])
    plt.close(fig)
    fig = plots.angle_curves({("sft", 5, "w"): np.array([0.1, 1.0])})
    np.testing.assert_allclose(fig.axes[0].get_lines()[0].get_ydata(), [0.1, 1.0])
    plt.close(fig)


def test_heatmap_puts_each_matrix_in_its_layer_and_module_cell():
    rows = [Row("sft", 5, f"model.layers.{layer}.{m}.weight", layer, m, "stable_rank", 10 * layer + i)
            for layer in range(3) for i, m in enumerate(("up_proj", "q_proj", "down_proj"))]
    fig = plots.heatmap(Table(rows), "stable_rank", vmin=0, vmax=30)
    image = fig.axes[0].get_images()[0]
    # modules in the architecture's order (q, up, down), layers top to bottom
    np.testing.assert_array_equal(image.get_array(), [[1, 0, 2], [11, 10, 12], [21, 20, 22]])
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["q_proj", "up_proj", "down_proj"]
    assert image.get_clim() == (0, 30)
    assert plots.png(fig).startswith(b"\x89PNG") and not plt.get_fignums()  # png() closes the figure


def test_standard_figures_and_a_self_contained_html_report(tmp_path):
    import torch
    from safetensors.torch import save_file

    import geometry
    from geometry.offline.figures import report_html, report_markdown, standard_figures

    g = torch.Generator().manual_seed(0)
    names = [f"model.layers.{i}.{b}.{m}.weight" for i in range(2)
             for b, m in (("self_attn", "q_proj"), ("self_attn", "o_proj"), ("mlp", "up_proj"))]
    base = {n: torch.randn(16, 16, generator=g) for n in names}
    (tmp_path / "base").mkdir()
    save_file(base, str(tmp_path / "base" / "model.safetensors"))
    for step in (2, 4, 6):
        (tmp_path / "run" / f"checkpoint-{step}").mkdir(parents=True)
        save_file({n: w + 1e-2 * step * torch.randn(16, 16, generator=g) for n, w in base.items()},
                  str(tmp_path / "run" / f"checkpoint-{step}" / "model.safetensors"))
    a = geometry.analyze(tmp_path / "base", [tmp_path / "run"], label="sft",
                         config=geometry.AnalysisConfig(lock_k=2, device="cpu"))
    figs = standard_figures(a)
    assert set(figs) == {"sparsity_localisation.png", "angles_spectra.png", "rank_norm.png", "locking.png",
                         "heatmap_sparsity_bf16.png", "heatmap_overlap_2s_ratio.png", "heatmap_stable_rank.png"}
    assert all(b.startswith(b"\x89PNG") for b in figs.values()) and not plt.get_fignums()
    md = report_markdown("# Summary\n\n| run | x |\n|---|---|\n| sft | 1 |\n", figs)
    assert "![locking](figures/locking.png)" in md
    page = report_html("# Summary\n\nText with **bold**.\n\n| run | x |\n|---|---|\n| sft | 1 |\n\n- a <note>\n", figs)
    assert page.count("data:image/png;base64,") == len(figs)
    assert "<td>sft</td>" in page and "<strong>bold</strong>" in page and "<li>a &lt;note&gt;</li>" in page
    assert "http" not in page.replace("data:image", "")  # nothing fetched when opened


def test_analyze_writes_figures_and_plot_re_renders_them_with_html(tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    from geometry.cli import main

    g = torch.Generator().manual_seed(1)
    base = {f"model.layers.{i}.self_attn.q_proj.weight": torch.randn(12, 12, generator=g) for i in range(2)}
    (tmp_path / "base").mkdir()
    save_file(base, str(tmp_path / "base" / "model.safetensors"))
    for step in (1, 2):
        (tmp_path / "run" / f"checkpoint-{step}").mkdir(parents=True)
        save_file({n: w + 0.01 * step * torch.randn(12, 12, generator=g) for n, w in base.items()},
                  str(tmp_path / "run" / f"checkpoint-{step}" / "model.safetensors"))
    out = tmp_path / "out"
    assert main(["analyze", str(tmp_path / "base"), str(tmp_path / "run"), "-o", str(out), "--lock-k", "2",
                 "--no-progress"]) == 0
    pngs = sorted(p.name for p in (out / "figures").iterdir())
    assert "locking.png" in pngs and "heatmap_stable_rank.png" in pngs and not (out / "report.html").exists()
    report = (out / "report.md").read_text()
    assert report.startswith((out / "summary.md").read_text().rstrip()) and "![locking](figures/locking.png)" in report
    for p in (out / "figures").iterdir():
        p.unlink()
    assert main(["plot", str(out), "--html"]) == 0
    assert sorted(p.name for p in (out / "figures").iterdir()) == pngs
    assert (out / "report.html").read_text().count("data:image/png;base64,") == len(pngs)
    assert not [p for p in out.rglob(".tmp*")]
    assert main(["plot", str(tmp_path / "base")]) == 2  # not an analysis output: one line, exit 2
    assert "not an output directory" in capsys.readouterr().err
    assert main(["analyze", str(tmp_path / "base"), str(tmp_path / "run"), "-o", str(tmp_path / "bare"),
                 "--no-figures", "--no-progress"]) == 0
    assert not (tmp_path / "bare" / "figures").exists() and not (tmp_path / "bare" / "report.md").exists()


def test_seeds_of_a_run_share_a_colour_and_one_legend_entry():
    rows = [Row(run, 1, "w", 0, "q_proj", "stable_rank", v)
            for run, v in (("sft/s0", 1.0), ("sft/s1", 2.0), ("rlvr/s0", 3.0), ("opd_mix/s0", 4.0))]
    fig = plots.metric_over_steps(Table(rows), "stable_rank")
    lines = fig.axes[0].get_lines()
    assert lines[0].get_color() == lines[1].get_color() != lines[2].get_color()
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["sft (2 runs)", "rlvr", "opd_mix"]
    plt.close(fig)
