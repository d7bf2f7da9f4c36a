"""Interactive explorers for the notebooks: controls above one picture that each change redraws.

    first = explorer(draw, {"p": IntSlider(...), "schedule": Dropdown(...)})

`draw(**values)` gets the controls' values and returns a matplotlib figure, a text, or a tuple
(text, figure[, result]); `explorer` shows the controls, the text and the figure, and returns
the first call's `result` (or figure) so that the notebook can assert on it.

Why not `interact` or an `Output` widget with `plt.show()` inside: in a real browser a figure
drawn from a widget callback is flushed by matplotlib's inline backend when the *next* cell runs,
so the callback's own message can carry a blank picture and the real one lands under another
cell; and a first plot drawn outside the `Output` stays underneath, stale, after every change.
Here each picture is rendered to PNG bytes and closed before anything is sent, and every change
replaces the contents of the same two displays (one `display_id` for the text, one for the
image): the cell always holds exactly one picture, the current one.

The first picture is an ordinary output, so it is saved in the executed notebook and shows on
GitHub and before any kernel runs. The controls' text form, which a front end shows when it
cannot render widgets (no kernel yet, an untrusted notebook), says to run the cell.
"""

from __future__ import annotations

import io

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

__all__ = ["explorer", "png"]

PLACEHOLDER = "▶ Interactive controls ({names}): run this cell (Shift+Enter) to use them."


def png(fig: Figure):
    """A figure as a PNG display object, rendered now; the figure is closed so that matplotlib's
    inline backend never shows it a second time."""
    from IPython.display import Image  # optional dependency: only notebooks display pictures

    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return Image(data=buf.getvalue(), format="png")


def _split(out):
    """draw's return value as (text, figure, result)."""
    if isinstance(out, Figure):
        return "", out, out
    if isinstance(out, str):
        return out, None, out
    text, fig, *rest = out
    return text or "", fig, (rest[0] if rest else fig)


def explorer(draw, controls: dict, per_row: int = 4, placeholder: str | None = None):
    """Show `controls` (name -> ipywidget) and what `draw(**values)` shows; redraw on each change."""
    import ipywidgets as widgets  # optional dependency: only notebooks use widgets
    from IPython.display import display

    for w in controls.values():
        if hasattr(w, "continuous_update"):
            w.continuous_update = False  # redraw when a slider is released, not at every pixel
    items = list(controls.values())
    box = widgets.VBox([widgets.HBox(items[i : i + per_row]) for i in range(0, len(items), per_row)])
    bundle = box._repr_mimebundle_()
    bundle["text/plain"] = placeholder or PLACEHOLDER.format(names=", ".join(controls))
    display(bundle, raw=True)

    def render():
        values = {k: w.value for k, w in controls.items()}
        try:
            text, fig, result = _split(draw(**values))
        except ValueError as err:  # a combination the strategy refuses: say which, and why
            shown = ", ".join(f"{k}={v}" for k, v in values.items())
            return f"cannot draw this combination ({shown}): {err}", None, None
        return text, (png(fig) if fig is not None else None), result

    text, image, first = render()
    text_handle = display({"text/plain": text}, raw=True, display_id=True)
    image_handle = display(image, display_id=True) if image is not None else None

    def on_change(_change=None):
        text, image, _ = render()  # draw first, then send both
        if image is not None and image_handle is not None:
            image_handle.update(image)
        text_handle.update({"text/plain": text}, raw=True)

    for w in items:
        w.observe(on_change, names="value")
    return first
