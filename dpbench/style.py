"""One colour and one marker per mechanism, the same in every figure dpbench draws.

Built-in mechanisms have fixed entries, so a figure with three mechanisms and one with nine agree; any
other name (a plugin) gets a colour and marker derived from its name, stable across runs and figures.
Figures are written as PNG and SVG by one function, so a redrawn figure is byte-identical to the last.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: Okabe-Ito colours (distinguishable with colour-vision deficiency), brown for the eighth mechanism and grey for
#: the non-private control.
_FIXED: dict[str, tuple[str, str]] = {
    "dpsgd": ("#000000", "o"),
    "dpis": ("#E69F00", "s"),
    "modelmix": ("#56B4E9", "^"),
    "auto_s": ("#009E73", "v"),
    "psac": ("#CC79A7", "D"),
    "psasc": ("#0072B2", "P"),
    "rs": ("#D55E00", "X"),
    "ged": ("#8C564B", "h"),
    "nonprivate": ("#666666", "*"),
}
_SPARE_COLOURS = ("#F0E442", "#17BECF", "#BCBD22", "#7F7F7F", "#9467BD", "#AEC7E8")
_SPARE_MARKERS = ("p", "<", ">", "d", "8", "H")


def mech_colour(mech: str) -> str:
    if mech in _FIXED:
        return _FIXED[mech][0]
    return _SPARE_COLOURS[zlib.crc32(mech.encode()) % len(_SPARE_COLOURS)]


def mech_marker(mech: str) -> str:
    if mech in _FIXED:
        return _FIXED[mech][1]
    return _SPARE_MARKERS[zlib.crc32(mech.encode()) // 7 % len(_SPARE_MARKERS)]


def save_png_and_svg(fig: Figure, png: str | Path) -> list[Path]:
    """Write ``fig`` as PNG and SVG beside it; the same figure gives the same bytes on every call.

    Matplotlib stamps SVGs with the date and random element ids, so a committed figure redrawn from
    unchanged rows would otherwise show a diff; a fixed salt and no date keep it byte-identical.
    """
    import matplotlib

    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    svg = png.with_suffix(".svg")
    fig.savefig(png, dpi=200, bbox_inches="tight")
    with matplotlib.rc_context({"svg.hashsalt": "dpbench"}):
        fig.savefig(svg, bbox_inches="tight", metadata={"Date": None})
    return [png, svg]


__all__ = ["mech_colour", "mech_marker", "save_png_and_svg"]
