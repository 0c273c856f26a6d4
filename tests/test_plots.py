"""Every plot of the project draws Chinese: the sweep's curves, the confusion matrices, report images."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from domainlm import plots


def _missing_glyphs(caught) -> list[str]:
    return [str(w.message) for w in caught if "missing from font" in str(w.message)]


def test_chinese_labels_render_without_a_missing_glyph(tmp_path):
    from domainlm.classify.metrics import confusion_png
    from domainlm.sweep.report import plot_curves

    assert plots.cjk_fonts(), "no CJK font on this machine: apt-get install fonts-noto-cjk"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plot_curves(
            {"基线模型 base": [(0, 0.5), (2, 0.61)], "领域预训练 step-2": [(0, 0.52), (2, 0.7)]},
            tmp_path / "curves.png",
            "准确率随预训练步数的变化",
            "准确率 (%)",
        )
        confusion_png([[5, 1, 0], [2, 3, 1], [0, 0, 4]], ["正面", "负面", "中性 neutral"], tmp_path / "confusion.png")
    assert _missing_glyphs(caught) == []
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "confusion.png").stat().st_size > 0
    # the glyphs came from a CJK font, not from boxes: the same text drawn with DejaVu Sans alone looks different
    import matplotlib

    plt = plots.pyplot()

    def pixels(families):
        fig = plt.figure(figsize=(2, 1))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fig.text(0.1, 0.4, "酒店服务", fontsize=20, family=families)
            fig.canvas.draw()
        image = np.asarray(fig.canvas.buffer_rgba()).copy()
        plt.close(fig)
        return image

    assert not np.array_equal(pixels(matplotlib.rcParams["font.family"]), pixels(["DejaVu Sans"]))


def test_without_a_cjk_font_one_line_says_how_to_get_one(monkeypatch, capsys):
    import matplotlib

    monkeypatch.setattr(plots, "cjk_fonts", lambda: ())
    with matplotlib.rc_context(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plt = plots.pyplot()
        assert plots.configure() == ()
        fig = plt.figure()
        fig.text(0.1, 0.5, "中文标签")
        fig.canvas.draw()
        plt.close(fig)
        assert _missing_glyphs(caught) == []  # not one warning per glyph: the line below says it once
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CJK font found" in err and "fonts-noto-cjk" in err


def test_a_font_file_of_ones_own_comes_first(monkeypatch):
    from matplotlib import font_manager

    path = font_manager.findfont(font_manager.FontProperties(family="DejaVu Serif"))
    monkeypatch.setenv(plots.FONT_ENV, path)
    plots.cjk_fonts.cache_clear()
    try:
        assert plots.cjk_fonts()[0] == "DejaVu Serif"
    finally:
        monkeypatch.delenv(plots.FONT_ENV)
        plots.cjk_fonts.cache_clear()


@pytest.fixture(autouse=True)
def _fresh_configuration():
    plots.configure.cache_clear()
    yield
    plots.configure.cache_clear()
