"""What ``cppo-detect`` writes: tokens.json, a self-contained report.html, shift plots, the views.

    write_outputs(detections, out_dir, settings)   # everything below, into out_dir
    terminal_summary(detection, top=10)            # the table printed for a single example

Files (``out_dir``):

- ``tokens.json``: the settings, the summary across examples (``cppo.detect.evidence.data_summary``),
  then per example the perturbation names and parameters of every draw, the outcome (truth, boxed
  answer, correct) and, per token, id, text, entropy, perturbed entropy, shift, its spread over
  draws, score, selected and answer_bearing (``Detection.to_dict`` plus those).
- ``report.html``: one file that opens offline (images inlined as base64 PNG, no script, no
  external style): a how-to-read line, the summary across examples (accuracy, the share of
  answer-bearing tokens among the selected ones against their base rate, per selector), then per
  example the truth and whether the model was right, the original and perturbed images side by
  side, the response with each token coloured by its shift (red: more uncertain without the
  information, blue: less), whitespace drawn visibly, the selected tokens outlined and the
  answer-bearing ones underlined, the per-token numbers on hover, a warning when every selected
  shift is near zero, the shift plot and summary numbers.
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
import json
from pathlib import Path

from cppo.detect.detection import Detection
from cppo.detect.evidence import bearing_of, data_summary, outcome, truth_of
from cppo.detect.explain import (
    WHITESPACE,
    how_to_read,
    is_special,
    noise_summary,
    noise_warning,
    outcome_line,
    summary_lines,
    visible,
)
from cppo.detect.figures import figures_html, shift_plot

MAX_EXAMPLES = 50


def _token_color(shift: float, scale: float) -> str:
    a = min(1.0, abs(shift) / scale) if scale > 0 else 0.0
    rgb = (214, 39, 40) if shift > 0 else (31, 119, 180)
    return f"rgba({rgb[0]},{rgb[1]},{rgb[2]},{0.08 + 0.62 * a:.3f})"


def _visible_html(text: str) -> str:
    """Token text for the strip: whitespace as faint glyphs (a newline also breaks the line)."""
    out = []
    for c in text:
        if c in WHITESPACE:
            out.append(f'<span class="ws">{WHITESPACE[c]}</span>' + ("<br>" if c == "\n" else ""))
        else:
            out.append(html.escape(c))
    return "".join(out)


def _tokens_html(det: Detection, bearing: list[bool]) -> str:
    scale = float(det.shift.abs().max()) if len(det.token_ids) else 0.0
    parts = []
    for t, text in enumerate(det.token_texts):
        s = float(det.shift[t])
        tip = (
            f"#{t} id {det.token_ids[t]} {text!r}  H(I)={float(det.entropy[t]):.4f}  "
            f"H(I-)={float(det.perturbed_entropy[t]):.4f}  dH={s:+.4f}"
            + (f" ±{float(det.shift_std[t]):.4f}" if det.draw_shifts.shape[0] > 1 else "")
            + f"  score={float(det.score[t]):.4f}"
            + (f"  KL={float(det.kl[t]):.4f}" if det.kl is not None else "")
            + ("  SELECTED" if bool(det.selected[t]) else "")
            + ("  answer-bearing" if bearing[t] else "")
        )
        cls = "tok" + (" sel" if bool(det.selected[t]) else "") + (" ans" if bearing[t] else "")
        cls += " special" if is_special(text) else ""
        parts.append(
            f'<span class="{cls}" style="background:{_token_color(s, scale)}" title="{html.escape(tip)}">'
            f"{_visible_html(text)}</span><wbr>"
        )
    return "".join(parts)


def _top_table(det: Detection, k: int = 10) -> str:
    rows = []
    for t in det.top_tokens(k, absolute=True):
        rows.append(
            f"<tr><td>{t}</td><td><code>{html.escape(visible(det.token_texts[t]))}</code></td>"
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
.ans{text-decoration:underline 2px #222;text-underline-offset:4px} .ws{color:#aaa;font-weight:400}
.special{font-size:11px;color:#666;border:1px dashed #999}
.howto{background:#f4f7fb;border-left:4px solid #1f77b4;padding:8px 12px;font-size:14px}
.warn{background:#fff4e5;border-left:4px solid #e67e00;padding:8px 12px;font-size:14px}
.right{color:#1a7f37;font-weight:700} .wrong{color:#c0392b;font-weight:700}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
td:nth-child(2){text-align:left} .plot{max-width:100%} .legend span{padding:2px 6px;margin-right:8px}
"""


def _outcome_html(o: dict) -> str:
    """The truth line of an example, the right/wrong marker coloured."""
    line = html.escape(outcome_line(o))
    for word, cls in (("✓ right", "right"), ("✗ wrong", "wrong")):
        line = line.replace(word, f"<span class='{cls}'>{word}</span>")
    return f"<p class='truth'>{line}</p>"


def report_html(
    detections: list[Detection],
    settings: dict,
    max_examples: int = MAX_EXAMPLES,
    plots: dict[int, bytes] | None = None,
    summary: dict | None = None,
) -> str:
    """The whole report as one HTML string (images inline, no external resources)."""
    plots = plots or {}
    summary = summary or data_summary(detections)
    shown = detections[:max_examples]
    draws = int(settings.get("draws", 1))
    g = {k: html.escape(str(settings.get(k, ""))) for k in settings}
    removing = html.escape(", ".join(settings.get("removing", [])))
    warning = noise_summary(detections)
    head = (
        f"<h1>cppo-detect: perception tokens</h1>"
        f"<p class='howto'>{html.escape(how_to_read(str(settings.get('selector', '')), draws))}</p>"
        f"<p class='meta'>model <code>{g.get('model', '')}</code>"
        f" · preset <b>{g.get('preset')}</b> (removing: {removing}) · <b>{draws} draw(s)</b> of the removing "
        f"view per example (dH is their mean) · selector <b>{g.get('selector')}</b>"
        f" · top {g.get('top_percent')} · temperature {g.get('temperature')}"
        f" · seed {g.get('seed')} · {g.get('device')} {g.get('dtype')}</p>"
        + (f"<p class='warn'><b>Warning:</b> {html.escape(warning)}.</p>" if warning else "")
        + f"<h2>Across the {len(detections)} example(s)</h2><ul class='meta'>"
        + "".join(f"<li>{html.escape(line)}</li>" for line in summary_lines(summary))
        + "</ul><p class='meta'>Answer-bearing tokens: those inside the last <code>\\boxed{...}</code>, and "
        "elsewhere the whole-word occurrences of the boxed answer or of the ground truth (the "
        "reasoning that spells the answer). Each selector, from the same statistics at rho "
        f"{summary['top_percent']:g}:</p>"
        + _selectors_table(summary)
        + (
            f"<p class='meta'>The first {len(shown)} examples are shown (all are in tokens.json).</p>"
            if len(shown) < len(detections)
            else ""
        )
        + "<p class='legend meta'><span style='background:rgba(214,39,40,.6)'>entropy rises without the "
        "information</span><span style='background:rgba(31,119,180,.6)'>entropy falls</span>"
        "<span class='sel'>selected</span><span class='ans'>answer-bearing</span> hover a token for its "
        "numbers</p>"
    )
    body = [_example_html(det, plots.get(det.index)) for det in shown]
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>cppo-detect report</title>"
        f"<style>{_CSS}</style></head><body>{head}{''.join(body)}</body></html>\n"
    )


def _selectors_table(summary: dict) -> str:
    rows = []
    for name, r in summary["selectors"].items():
        share = "-" if r["share"] is None else f"{r['share']:.1%}"
        ratio = "-" if r["enrichment"] is None else f"{r['enrichment']:.2f}"
        mark = " (this report)" if name == summary["selector"] else ""
        rows.append(
            f"<tr><td>{html.escape(name)}{mark}</td><td>{r['selected']}</td><td>{r['answer_bearing']}</td>"
            f"<td>{share}</td><td>{ratio}</td></tr>"
        )
    return (
        "<table><tr><th>selector</th><th>selected</th><th>answer-bearing</th><th>share</th>"
        "<th>× base rate</th></tr>"
        + "".join(rows)
        + "</table>"
        + (
            ""
            if "kl_shift" in summary["selectors"]
            else "<p class='meta'>kl_shift: not compared (it needs the KL, computed with --data or "
            "--selector kl_shift).</p>"
        )
    )


def _example_html(det: Detection, plot: bytes | None) -> str:
    s = det.summary()
    o = outcome(det.response_text, truth_of(det))
    warning = noise_warning(det)
    return (
        f"<h2>Example {det.index}{': ' + html.escape(det.example.name) if det.example.name else ''}</h2>"
        f"<p><b>Prompt:</b> {html.escape(det.example.prompt)}</p>"
        + _outcome_html(o)
        + (f"<p class='warn'><b>Warning:</b> {html.escape(warning)}.</p>" if warning else "")
        + figures_html(det)
        + f"<p class='meta'>response ({'generated' if det.generated else 'given'}): {s['tokens']} tokens, "
        f"{s['positive_shift']} with a positive shift, {s['selected']} selected"
        f" · mean dH {s['mean_shift']:+.4f}"
        f" (selected {s['mean_shift_selected']:+.4f}) · mean H(I) {s['mean_entropy']:.4f}, "
        f"H(I-) {s['mean_perturbed_entropy']:.4f}</p>"
        f"<div class='resp'>{_tokens_html(det, bearing_of(det))}</div>"
        + (
            f"<img class='plot' src='data:image/png;base64,{base64.b64encode(plot).decode()}'>"
            if plot
            else ""
        )
        + f"<details><summary>top tokens by |dH|</summary>{_top_table(det)}</details>"
    )


def example_dict(det: Detection) -> dict:
    """``Detection.to_dict`` plus the outcome, the near-zero warning and per-token answer_bearing."""
    d = det.to_dict()
    d["outcome"] = outcome(det.response_text, truth_of(det))
    d["warning"] = noise_warning(det)
    for row, flag in zip(d["tokens"], bearing_of(det)):
        row["answer_bearing"] = flag
    return d


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
    summary = data_summary(detections)
    tokens = out / "tokens.json"
    doc = {"settings": settings, "summary": summary, "examples": [example_dict(d) for d in detections]}
    tokens.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    report = out / "report.html"
    report.write_text(report_html(detections, settings, max_examples, plots, summary), encoding="utf-8")
    return {"tokens": tokens, "report": report, "plots": plot_paths, "images": out / "images"}


def terminal_summary(det: Detection, top: int = 10) -> str:
    """The example in plain text: outcome, response (whitespace visible), the ``top`` tokens by |dH|."""
    s = det.summary()
    bearing = bearing_of(det)
    warning = noise_warning(det)
    lines = [
        how_to_read(det.selector, int(det.draw_shifts.shape[0])),
        outcome_line(outcome(det.response_text, truth_of(det))),
        f"response ({s['tokens']} tokens, {'generated' if det.generated else 'given'}): "
        f"{visible(det.response_text)}",
        f"{s['positive_shift']} tokens with a positive shift, {s['selected']} selected ({det.selector}, "
        f"top {det.top_percent:g}); mean dH {s['mean_shift']:+.4f}, selected {s['mean_shift_selected']:+.4f}",
        *([f"warning: {warning}"] if warning else []),
        f"{'pos':>4} {'token':<16} {'H(I)':>8} {'H(I-)':>8} {'dH':>9} {'score':>8}  selected  answer",
    ]
    for t in det.top_tokens(top, absolute=True):
        lines.append(
            f"{t:>4} {visible(det.token_texts[t])[:16]:<16} {float(det.entropy[t]):>8.4f} "
            f"{float(det.perturbed_entropy[t]):>8.4f} {float(det.shift[t]):>+9.4f} "
            f"{float(det.score[t]):>8.4f}  {'*' if bool(det.selected[t]) else '':<8}  "
            f"{'*' if bearing[t] else ''}"
        )
    return "\n".join(line.rstrip() for line in lines)
