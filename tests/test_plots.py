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
