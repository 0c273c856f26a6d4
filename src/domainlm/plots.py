"""matplotlib for every plot of the project (sweep plots, curves, confusion matrices): a headless backend and fonts
that draw Chinese labels.

matplotlib's own default (DejaVu Sans) has no Chinese glyphs, also where a CJK font is installed, so every label in
Chinese came out as boxes. Here the font family is DejaVu Sans (Latin, digits, symbols such as ★) followed by
the CJK fonts this machine has; matplotlib (3.6+) falls back glyph by glyph along that list. A font file of one's
own is added with DOMAINLM_PLOT_FONT=/path/font.otf (several: joined with os.pathsep). Without any CJK font one
line says how to get one, instead of one warning per missing glyph.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings

FONT_ENV = "DOMAINLM_PLOT_FONT"
# Chinese sans-serif fonts by preference: Noto / Source Han (fonts-noto-cjk, also what most Linux distributions ship),
# WenQuanYi (fonts-wqy-*), the macOS and Windows ones, then the Japanese / Korean / traditional cuts of Noto (which
# still draw nearly every simplified character).
CJK_FONTS = (
    "Noto Sans CJK SC",
    "Source Han Sans SC",
    "Noto Sans SC",
    "Source Han Sans CN",
    "WenQuanYi Zen Hei",
    "WenQuanYi Micro Hei",
    "Sarasa Gothic SC",
    "PingFang SC",
    "Hiragino Sans GB",
    "Heiti SC",
    "STHeiti",
    "Microsoft YaHei",
    "SimHei",
    "Droid Sans Fallback",
    "AR PL UMing CN",
    "AR PL UKai CN",
    "Noto Sans CJK TC",
    "Noto Sans CJK HK",
    "Noto Sans CJK JP",
    "Noto Sans CJK KR",
    "Noto Serif CJK SC",
    "Source Han Serif SC",
)
LATIN = "DejaVu Sans"


@functools.cache
def cjk_fonts() -> tuple[str, ...]:
    """The CJK fonts matplotlib can use here, best first (fonts named in DOMAINLM_PLOT_FONT first of all)."""
    from matplotlib import font_manager

    own = []
    for path in filter(None, os.environ.get(FONT_ENV, "").split(os.pathsep)):
        try:
            font_manager.fontManager.addfont(path)
            own.append(font_manager.FontProperties(fname=path).get_name())
        except (OSError, RuntimeError, ValueError) as e:
            print(f"{FONT_ENV}: cannot use {path} as a font ({e})", file=sys.stderr)
    available = {f.name for f in font_manager.fontManager.ttflist}
    return tuple(dict.fromkeys([*own, *(name for name in CJK_FONTS if name in available)]))


@functools.cache
def configure() -> tuple[str, ...]:
    """Set the font list once per process; returns the CJK fonts in it (empty: Chinese would show as boxes)."""
    import matplotlib

    fonts = cjk_fonts()
    # the family list itself, not font.sans-serif: matplotlib falls back along the family list only
    matplotlib.rcParams["font.family"] = [LATIN, *fonts]
    matplotlib.rcParams["axes.unicode_minus"] = False  # CJK fonts often lack U+2212
    if not fonts:
        print(
            "plots: no CJK font found, so Chinese labels show as boxes; install one (Debian/Ubuntu: apt-get install "
            f"fonts-noto-cjk) or set {FONT_ENV}=/path/to/font.otf",
            file=sys.stderr,
        )
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from font")  # said once above
    return fonts


def pyplot():
    """matplotlib.pyplot on the headless Agg backend, with fonts that draw Chinese."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configure()
    return plt
