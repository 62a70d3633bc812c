"""What the eval pictures draw (colours, legend and title placement, row labels) and the keys their
reports share. Drawn figures are captured where they are saved and measured, not compared as pixels."""

from __future__ import annotations

import colorsys
import json

import numpy as np
import pytest

from tests.conftest import make_images, tiny_run


def capture(monkeypatch, module) -> list:
    """The figures ``module`` saves (through its ``save_png``), drawn as saved."""
    figs = []
    real = module.save_png

    def keep(fig, out, dpi, tight_rect=None):
        figs.append(fig)
        return real(fig, out, dpi, tight_rect)

    monkeypatch.setattr(module, "save_png", keep)
    return figs


def extent(artist, fig):
    return artist.get_window_extent(fig.canvas.get_renderer())


def tsne_figure(monkeypatch, tmp_path, labels):
    import sslkit.eval.tsne as tsne

    figs = capture(monkeypatch, tsne)
    xy = np.random.default_rng(0).normal(size=(len(labels), 2))
    size = tsne.plot_maps({"pretrained": xy, "random": xy}, labels, "t-SNE", tmp_path / "map.png")
    fig = figs[0]
    assert size == tuple(int(round(v * 100)) for v in fig.get_size_inches())
    return fig


def test_tsne_25_classes_get_25_distinct_colours_none_grey(monkeypatch, tmp_path):
    labels = [f"class{i % 25:02d}" for i in range(250)] + ["(unlabelled)"] * 5
    fig = tsne_figure(monkeypatch, tmp_path, labels)
    colours = {c.get_label(): tuple(np.round(c.get_facecolor()[0][:3], 3)) for c in fig.axes[0].collections}
    named = [v for k, v in colours.items() if not k.startswith("(unlabelled)")]
    assert len(named) == 25 and len(set(named)) == 25  # tab20 % 20 gave class00 and class20 one colour
    grey = colours[next(k for k in colours if k.startswith("(unlabelled)"))]
    for rgb in named:
        assert colorsys.rgb_to_hsv(*rgb)[1] > 0.2 and rgb != grey  # no class in the unlabelled grey


def test_tsne_legend_outside_the_panels_long_labels_shortened(monkeypatch, tmp_path):
    labels = [f"class{i % 25:02d}" for i in range(100)] + ["x" * 120] * 10
    fig = tsne_figure(monkeypatch, tmp_path, labels)
    legends = fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert legends
    right = max(extent(ax, fig).x1 for ax in fig.axes)
    width, height = fig.get_size_inches() * fig.dpi
    for lg in legends:
        box = extent(lg, fig)
        assert box.x0 >= right and box.x1 <= width + 1 and box.y0 >= -1 and box.y1 <= height + 1
        texts = [t.get_text() for t in lg.get_texts()]
        assert max(map(len, texts)) <= 40 + len(" (10)") and any("…" in t for t in texts)
    for ax in fig.axes:  # a 120-character label no longer squeezes the panels
        assert extent(ax, fig).width > 0.8 * 6 * fig.dpi


@pytest.mark.parametrize("rows,title", [(1, "CLS attention, last layer: mae timm:vit"), (8, "Grad-CAM: simclr"),
                                        (16, "CLS attention: mae vit\nclass-token attention; embedding is the mean")])
def test_attention_title_clears_the_column_headers(monkeypatch, tmp_path, rows, title):
    import sslkit.eval.attention as attention

    figs = capture(monkeypatch, attention)
    rng = np.random.default_rng(0)
    maps = {"pretrained": rng.random((rows, 2, 16, 16)), "random": rng.random((rows, 2, 16, 16))}
    size = attention.plot_grid(rng.random((rows, 1, 16, 16)), maps, title, tmp_path / "a.png", ["NORMAL"] * rows)
    fig = figs[0]
    assert size == (5 * 200, rows * 200)
    suptitle = extent(fig._suptitle, fig)
    headers = [extent(ax.title, fig) for ax in fig.axes if ax.get_title()]
    assert len(headers) == 5 and suptitle.y0 > max(h.y1 for h in headers)  # above every column header
    assert suptitle.y1 <= fig.get_size_inches()[1] * fig.dpi  # and inside the figure


def test_attention_long_row_label_stays_in_its_cell(monkeypatch, tmp_path):
    import sslkit.eval.attention as attention

    figs = capture(monkeypatch, attention)
    rng = np.random.default_rng(0)
    label = "PNEUMONIA_" + "VERY_LONG_CLASS_NAME_" * 5
    attention.plot_grid(rng.random((2, 3, 16, 16)), {"pretrained": rng.random((2, 1, 16, 16))}, "t",
                        tmp_path / "a.png", [label, "NORMAL"])
    fig = figs[0]
    cell = fig.axes[0]
    text = next(t for t in cell.texts if t.get_text() != "NORMAL")
    assert "…" in text.get_text() and text.get_text().startswith("PNEUMONIA")
    assert extent(text, fig).x1 <= extent(cell, fig).x1


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pictures")
    data = make_images(root / "data", n_per_class=6, size=16)
    for i, p in enumerate(sorted((data / "a").iterdir())[:3]):  # unlabelled: files at the data root
        p.rename(data / f"loose{i}.png")
    tiny_run(str(data), root / "run", 16)
    return root


def _json(result):
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_tsne_report_counts_classes_and_text_says_unlabelled_are_grey(run, cli):
    rep = _json(cli("eval", "tsne", run / "run", "--data", run / "data", "--perplexity", "3", "--no-baseline",
                    "--out", run / "t.png", "--json", "--quiet"))
    assert rep["data"]["data"]["samples"] == 12 and rep["data"]["data"]["unlabelled"] == 3
    assert rep["class_counts"] == {"plotted": {"a": 3, "b": 6}}
    assert rep["model"]["encoder_sha256"] == json.loads((run / "run" / "run.json").read_text())["encoder_sha256"]
    text = cli("eval", "tsne", run / "run", "--data", run / "data", "--perplexity", "3", "--no-baseline",
               "--out", run / "t2.png", "--quiet")
    assert text.exit_code == 0 and "3 unlabelled (grey)" in text.stdout and "skipped" not in text.stdout


def test_attention_report_samples_are_images_read_rows_are_drawn(run, cli):
    rep = _json(cli("eval", "attention", run / "run", "--data", run / "data", "--max-images", "2", "--no-baseline",
                    "--out", run / "a.png", "--json", "--quiet"))
    assert rep["data"]["data"]["samples"] == 12 and rep["data"]["data"]["rows"] == 2
    assert rep["model"]["encoder_sha256"] and rep["model"]["checkpoint_step"] is None


def test_curve_names_its_plotted_score_score_and_reads_old_reports(run, cli, monkeypatch, tmp_path):
    rep = _json(cli("eval", "curve", run / "run", "--data", run / "data", "--split", "group:2", "--fractions", "1",
                    "--k", "3", "--C", "1", "--no-baseline", "--out", run / "c.png", "--json", "--quiet"))
    assert rep["settings"]["score"] == "auroc" and "metric" not in rep["settings"]
    import sslkit.eval.curve_plot as curve_plot

    old = {**rep, "settings": {k: v for k, v in rep["settings"].items() if k != "score"}}
    old["settings"]["metric"] = "auroc"  # a report written before the rename
    old["results"]["random"] = old["results"]["pretrained"]  # two encoders with equal points
    figs = capture(monkeypatch, curve_plot)
    curve_plot.plot_curve(old, tmp_path / "old.png")
    assert "9 images in" in figs[0]._suptitle.get_text()  # n and groups in the title
    xs = [tuple(line.get_xdata()) for line in figs[0].axes[0].lines if len(line.get_xdata()) == 1]
    assert len(set(xs)) == 2  # dodged: one encoder's bars do not hide the other's



def test_a_report_names_the_run_and_its_settings(run, cli):
    """``model.run_id`` and ``config_sha256`` are run.json's, so a report is tied to the run that made it."""
    info = json.loads((run / "run" / "run.json").read_text())
    rep = _json(cli("eval", "knn", run / "run", "--data", run / "data", "--split", "group:2", "--no-baseline",
                    "--json", "--quiet"))
    model = rep["model"]
    assert model["run_id"] == info["run_id"] and len(model["run_id"]) == 32
    assert model["config_sha256"] == info["config_sha256"] and model["encoder_sha256"] == info["encoder_sha256"]


def test_a_run_recorded_before_run_ids_is_named_as_its_export_names_it(run, cli, tmp_path):
    """eval and export agree on an old run (no run_id / config_sha256 in run.json): the same fallbacks."""
    import shutil

    from sslkit.export import export_metadata
    from sslkit.run import load_run

    old = tmp_path / "old"
    shutil.copytree(run / "run", old)
    info = json.loads((old / "run.json").read_text())
    del info["run_id"], info["config_sha256"]
    (old / "run.json").write_text(json.dumps(info))
    meta = export_metadata(load_run(old), load_run(old).build_encoder())
    model = _json(cli("eval", "knn", old, "--data", run / "data", "--split", "group:2", "--no-baseline",
                      "--json", "--quiet"))["model"]
    assert (model["run_id"], model["config_sha256"], model["step"]) == (
        meta["run_id"], meta["config_sha256"], meta["step"]) and model["step"] == 1
