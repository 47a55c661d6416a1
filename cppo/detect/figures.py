"""The pictures of a detection: the shift plot, the images inlined in report.html.

shift_plot(det, "shift_0000.png")   # PNG bytes of the per-token shift bars (and the file)
figures_html(det)                   # the original and every removing view, base64 inline
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np
from PIL import Image

from cppo.detect.detection import Detection
from cppo.detect.explain import visible
from cppo.perturb.image import to_rgb


def _png_b64(image: Image.Image, max_side: int = 448) -> str:
    img = to_rgb(image)  # a new image: thumbnail below works in place
    if max(img.size) < 224:  # tiny task images: enlarge with nearest so the pixels stay visible
        f = max(1, 224 // max(img.size))
        img = img.resize((img.width * f, img.height * f), Image.NEAREST)
    elif max(img.size) > max_side:
        img.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _label(text: str) -> str:
    """A tick label: whitespace drawn visibly, other non-printable characters escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in visible(text))


def shift_plot(det: Detection, path: str | Path | None = None, max_labels: int = 96) -> bytes:
    """Bar plot of the per-token shift, selected tokens highlighted; returns the PNG bytes (and writes it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    T = len(det.token_ids)
    shift = det.shift.numpy()  # (T,)
    sel = det.selected.numpy()  # (T,)
    fig_w = min(16.0, max(6.0, 0.18 * T + 2))
    fig, ax = plt.subplots(figsize=(fig_w, 3.2), dpi=110)
    x = np.arange(T)
    colors = np.where(sel, "#d62728", np.where(shift > 0, "#f2a7a0", "#9ecae1"))
    yerr = det.shift_std.numpy() if det.draw_shifts.shape[0] > 1 else None
    ax.bar(x, shift, color=colors, yerr=yerr, error_kw={"elinewidth": 0.6, "ecolor": "#555"}, width=0.85)
    ax.axhline(0, color="#333", linewidth=0.6)
    ax.set_xlim(-0.6, T - 0.4)
    ax.set_ylabel("dH = H(I-) - H(I)  [nats]")
    k = det.draw_shifts.shape[0]
    ax.set_title(
        f"example {det.index}: entropy shift per response token\n{det.selector}, top {det.top_percent:g}, "
        f"{k} draw{'s' if k > 1 else ''}; dark red = selected"
        + ("; bars: spread over draws" if k > 1 else ""),
        fontsize=9,
    )
    if T <= max_labels:
        ax.set_xticks(x)
        ax.set_xticklabels([_label(t) for t in det.token_texts], rotation=90, fontsize=7)
    else:
        ax.set_xlabel("response token")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    data = buf.getvalue()
    if path is not None:
        Path(path).write_bytes(data)
    return data


def figures_html(det: Detection) -> str:
    figs = []
    for j, img in enumerate(det.example.images):
        figs.append(
            f"<figure><img src='data:image/png;base64,{_png_b64(img)}'><figcaption>original"
            f"{f' image {j}' if len(det.example.images) > 1 else ''} {img.width}×{img.height}"
            "</figcaption></figure>"
        )
    for k, (recs, imgs) in enumerate(zip(det.views, det.perturbed_images)):
        for j, (rec, img) in enumerate(zip(recs, imgs)):
            params = ", ".join(
                f"{p}={v:.3g}" if isinstance(v, float) else f"{p}={v}"
                for p, v in rec["params"].items()
                if not isinstance(v, list | dict)
            )
            figs.append(
                f"<figure><img src='data:image/png;base64,{_png_b64(img)}'><figcaption>I- draw {k}"
                f"{f' image {j}' if len(imgs) > 1 else ''}: <b>{html.escape(rec['name'])}</b> "
                f"{html.escape(params)}</figcaption></figure>"
            )
    return f"<div class='imgs'>{''.join(figs)}</div>"
