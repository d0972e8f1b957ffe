"""summary.md, report.md and report.html: every table keeps its columns as markdown-it-py (report.html's
renderer) parses them; text from the user's files reaches the page escaped."""

import torch
from md_tables import assert_tables_keep_columns, tables
from safetensors.torch import save_file

import geometry
from geometry.offline.markdown import table, to_html
from geometry.offline.outputs import write_analysis


def test_a_pipe_in_a_cell_stays_in_its_cell():
    md = table(["run", "sparsity, |D| <= 1e-5 (%)", "||D||_F"], [["a|b", 1, ""]])
    assert tables(md) == [[["run", "sparsity, |D| <= 1e-5 (%)", "||D||_F"], ["a|b", "1", ""]]]
    page = to_html(md)
    assert "<th>sparsity, |D| &lt;= 1e-5 (%)</th>" in page and "<th>||D||_F</th>" in page
    assert "<td>a|b</td>" in page


def test_html_in_the_text_is_escaped_not_run():
    page = to_html("- a note on `model.<x>` from <script>alert(1)</script>\n")
    assert "<script>" not in page and "&lt;script&gt;" in page and "<code>model.&lt;x&gt;</code>" in page


def test_every_table_of_a_real_analysis_keeps_its_columns(tmp_path, one_thread):
    g = torch.Generator().manual_seed(0)
    names = [f"model.layers.{i}.{b}.{m}.weight" for i in range(2)
             for b, m in (("self_attn", "q_proj"), ("self_attn", "v_proj"), ("mlp", "up_proj"))]
    base = {n: torch.randn(16, 12, generator=g) for n in names}
    (tmp_path / "base").mkdir()
    save_file(base, str(tmp_path / "base" / "model.safetensors"))
    runs = []
    for label, scale in (("sft", 1e-2), ("rl|vr", 1e-3)):  # a '|' in a run label too
        for step in (2, 4, 6):
            ckpt = tmp_path / label.replace("|", "") / f"checkpoint-{step}"
            ckpt.mkdir(parents=True)
            save_file({n: w + scale * step * torch.randn(w.shape, generator=g) for n, w in base.items()},
                      str(ckpt / "model.safetensors"))
        runs.append(geometry.Run(label, tmp_path / "base", [tmp_path / label.replace("|", "")]))
    a = geometry.analyze(runs, config=geometry.AnalysisConfig(principal_k=2, lock_k=2, device="cpu"))
    write_analysis(a, tmp_path / "out", figures=True, html=True)
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "\\|D\\|" in summary and "\\|\\|D\\|\\|_F" in summary  # headers that split their tables unescaped
    assert assert_tables_keep_columns(summary) >= 7
    assert assert_tables_keep_columns((tmp_path / "out" / "report.md").read_text()) >= 7
    page = (tmp_path / "out" / "report.html").read_text()
    assert "<th>sparsity, |D| &lt;= 1e-5 (%)</th>" in page and "<th>||D||_F</th>" in page
    assert "<td>rl|vr</td>" in page
