"""What ``cppo-detect`` writes: tokens.json, a self-contained report.html, shift plots, the views.

    write_outputs(detections, out_dir, settings)   # everything below, into out_dir
    terminal_summary(detection, top=10)            # the table printed for a single example

Files (``out_dir``):

- ``tokens.json``: the settings, then per example the perturbation names and parameters of every
  draw and, per token, id, text, entropy, perturbed entropy, shift, its spread over draws, score
  and selected (``Detection.to_dict``).
- ``report.html``: one file that opens offline (images inlined as base64 PNG, no script, no
  external style): per example the original and perturbed images side by side, the response with
  each token coloured by its shift (red: more uncertain without the information, blue: less) and
  the selected tokens boxed, the per-token numbers on hover, the shift plot, and summary numbers.
- ``shift_NNNN.png``: per-token shift as bars, selected tokens highlighted, spread over draws as
  error bars when K > 1.
- ``images/NNNN_original_J.png`` and ``images/NNNN_drawK_J.png``: the original and removing views.

Plots, images and report sections are written for the first ``max_examples`` examples (default 50)
only, so a run over a whole dataset stays a readable file; ``tokens.json`` always holds every
example.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from cppo.detect.detector import Detection
from cppo.perturb.image import to_rgb

MAX_EXAMPLES = 50


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
    """A tick label: non-printable characters escaped (fonts have no glyph for them)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text) or "' '"


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


def _token_color(shift: float, scale: float) -> str:
    a = min(1.0, abs(shift) / scale) if scale > 0 else 0.0
    rgb = (214, 39, 40) if shift > 0 else (31, 119, 180)
    return f"rgba({rgb[0]},{rgb[1]},{rgb[2]},{0.08 + 0.62 * a:.3f})"


def _tokens_html(det: Detection) -> str:
    scale = float(det.shift.abs().max()) if len(det.token_ids) else 0.0
    parts = []
    for t, text in enumerate(det.token_texts):
        s = float(det.shift[t])
        tip = (
            f"#{t} id {det.token_ids[t]}  H(I)={float(det.entropy[t]):.4f}  "
            f"H(I-)={float(det.perturbed_entropy[t]):.4f}  dH={s:+.4f}"
            + (f" ±{float(det.shift_std[t]):.4f}" if det.draw_shifts.shape[0] > 1 else "")
            + f"  score={float(det.score[t]):.4f}"
            + (f"  KL={float(det.kl[t]):.4f}" if det.kl is not None else "")
            + ("  SELECTED" if bool(det.selected[t]) else "")
        )
        cls = "tok sel" if bool(det.selected[t]) else "tok"
        shown = html.escape(text).replace("\n", "&#8629;<br>") or "&nbsp;"
        parts.append(
            f'<span class="{cls}" style="background:{_token_color(s, scale)}" title="{html.escape(tip)}">'
            f"{shown}</span>"
        )
    return "".join(parts)


def _top_table(det: Detection, k: int = 10) -> str:
    rows = []
    for t in det.top_tokens(k):
        rows.append(
            f"<tr><td>{t}</td><td><code>{html.escape(repr(det.token_texts[t]))}</code></td>"
            f"<td>{float(det.entropy[t]):.4f}</td><td>{float(det.perturbed_entropy[t]):.4f}</td>"
            f"<td>{float(det.shift[t]):+.4f}</td><td>{float(det.score[t]):.4f}</td>"
            f"<td>{'yes' if bool(det.selected[t]) else ''}</td></tr>"
        )
    return (
        "<table><tr><th>#</th><th>token</th><th>H(I)</th><th>H(I-)</th><th>dH</th><th>score</th>"
        "<th>selected</th></tr>" + "".join(rows) + "</table>"
    )


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;
max-width:1200px}
h1{font-size:20px} h2{font-size:16px;margin-top:28px;border-top:1px solid #ddd;padding-top:16px}
.meta{color:#555;font-size:13px} .imgs{display:flex;gap:14px;flex-wrap:wrap}
figure{margin:0} figcaption{font-size:12px;color:#555;max-width:240px;word-break:break-word}
.imgs img{border:1px solid #ccc;image-rendering:pixelated;max-width:240px}
.resp{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:15px;line-height:2.1;background:#fafafa;
padding:10px;border:1px solid #e5e5e5;white-space:pre-wrap}
.tok{border-radius:3px;padding:1px 0} .sel{outline:2px solid #b00;font-weight:700}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
td:nth-child(2){text-align:left} .plot{max-width:100%} .legend span{padding:2px 6px;margin-right:8px}
"""


def report_html(
    detections: list[Detection],
    settings: dict,
    max_examples: int = MAX_EXAMPLES,
    plots: dict[int, bytes] | None = None,
) -> str:
    """The whole report as one HTML string (images inline, no external resources)."""
    plots = plots or {}
    shown = detections[:max_examples]
    n_tok = sum(d.summary()["tokens"] for d in detections)
    n_sel = sum(d.summary()["selected"] for d in detections)
    g = {k: html.escape(str(settings.get(k, ""))) for k in settings}
    removing = html.escape(", ".join(settings.get("removing", [])))
    head = (
        f"<h1>cppo-detect: perception tokens</h1><p class='meta'>model <code>{g.get('model', '')}</code>"
        f" · preset <b>{g.get('preset')}</b> (removing: {removing}) · selector <b>{g.get('selector')}</b>"
        f" · top {g.get('top_percent')} · {g.get('draws')} draw(s) · temperature {g.get('temperature')}"
        f" · seed {g.get('seed')} · {g.get('device')} {g.get('dtype')}</p>"
        f"<p class='meta'>{len(detections)} example(s), {n_tok} response tokens, {n_sel} selected"
        + (
            f"; the first {len(shown)} are shown (every example is in tokens.json)"
            if len(shown) < len(detections)
            else ""
        )
        + "</p><p class='legend meta'><span style='background:rgba(214,39,40,.6)'>entropy rises without the "
        "information</span><span style='background:rgba(31,119,180,.6)'>entropy falls</span>"
        "<span class='sel'>selected</span> hover a token for its numbers</p>"
    )
    body = []
    for det in shown:
        s = det.summary()
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
        plot = plots.get(det.index)
        body.append(
            f"<h2>Example {det.index}{': ' + html.escape(det.example.name) if det.example.name else ''}</h2>"
            f"<p><b>Prompt:</b> {html.escape(det.example.prompt)}</p>"
            f"<div class='imgs'>{''.join(figs)}</div>"
            f"<p class='meta'>response ({'generated' if det.generated else 'given'}): {s['tokens']} tokens, "
            f"{s['positive_shift']} with a positive shift, {s['selected']} selected"
            f" · mean dH {s['mean_shift']:+.4f}"
            f" (selected {s['mean_shift_selected']:+.4f}) · mean H(I) {s['mean_entropy']:.4f}, "
            f"H(I-) {s['mean_perturbed_entropy']:.4f}</p>"
            f"<div class='resp'>{_tokens_html(det)}</div>"
            + (
                f"<img class='plot' src='data:image/png;base64,{base64.b64encode(plot).decode()}'>"
                if plot
                else ""
            )
            + f"<details><summary>top tokens by shift</summary>{_top_table(det)}</details>"
        )
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>cppo-detect report</title>"
        f"<style>{_CSS}</style></head><body>{head}{''.join(body)}</body></html>\n"
    )


def write_outputs(
    detections: list[Detection], out_dir: str | Path, settings: dict, max_examples: int = MAX_EXAMPLES
) -> dict[str, Path]:
    """Write every output file into ``out_dir``.

    Returns {"tokens": path, "report": path, "plots": [paths], "images": folder}.
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    plots: dict[int, bytes] = {}
    plot_paths = []
    for det in detections[:max_examples]:
        p = out / f"shift_{det.index:04d}.png"
        plots[det.index] = shift_plot(det, p)
        plot_paths.append(p)
        for j, img in enumerate(det.example.images):
            img.save(out / "images" / f"{det.index:04d}_original_{j}.png")
        for k, imgs in enumerate(det.perturbed_images):
            for j, img in enumerate(imgs):
                img.save(out / "images" / f"{det.index:04d}_draw{k}_{j}.png")
    tokens = out / "tokens.json"
    doc = {"settings": settings, "examples": [d.to_dict() for d in detections]}
    tokens.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    report = out / "report.html"
    report.write_text(report_html(detections, settings, max_examples, plots), encoding="utf-8")
    return {"tokens": tokens, "report": report, "plots": plot_paths, "images": out / "images"}


def terminal_summary(det: Detection, top: int = 10) -> str:
    """A plain-text table of the ``top`` tokens by shift, with the example's summary line."""
    s = det.summary()
    lines = [
        f"response ({s['tokens']} tokens, {'generated' if det.generated else 'given'}): "
        f"{det.response_text!r}",
        f"{s['positive_shift']} tokens with a positive shift, {s['selected']} selected ({det.selector}, "
        f"top {det.top_percent:g}); mean dH {s['mean_shift']:+.4f}, selected {s['mean_shift_selected']:+.4f}",
        f"{'pos':>4} {'token':<16} {'H(I)':>8} {'H(I-)':>8} {'dH':>9} {'score':>8}  selected",
    ]
    for t in det.top_tokens(top):
        lines.append(
            f"{t:>4} {repr(det.token_texts[t])[:16]:<16} {float(det.entropy[t]):>8.4f} "
            f"{float(det.perturbed_entropy[t]):>8.4f} {float(det.shift[t]):>+9.4f} "
            f"{float(det.score[t]):>8.4f}  "
            f"{'*' if bool(det.selected[t]) else ''}"
        )
    return "\n".join(lines)
