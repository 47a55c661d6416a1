"""Does the entropy shift find perception tokens? The measured table of docs/detect.md.

    python bench/detect_evidence.py --out runs/detect-evidence            # demo model, 400 test items
    python bench/detect_evidence.py --model runs/cppo/final --n 100 --draws 4

On the shapes test split (``cppo.toy.export_shapes_dataset``, seed 0), the model generates one
response per question (sampled at temperature 1.0, the rollout setting, seed 0). The SAME responses
are then teacher-forced under every removing perturbation of the registry, so the perturbations are
compared on identical tokens. Every token is classed by ``cppo.detect.evidence.token_classes``
(visual answer words, answer words echoed from the question, format tokens, other; inside or
outside ``\\boxed{}``). Reported:

1. per perturbation, the mean shift dH = H(I-) - H(I) of each class (nats, with counts);
2. per perturbation and selector, the share of selected tokens in each class against the share of
   all response tokens (the expectation of a random pick), and the enrichment of visual answer
   tokens (share selected / share overall). Selectors ``relative``, ``raw`` and ``kl_shift`` keep
   the top rho = 0.5 of their candidates (the paper's rho); ``entropy`` keeps the top 0.2 of all
   tokens (its 80/20 rule) and does not depend on the perturbation.

Writes ``evidence.json`` and ``evidence.md`` (the tables) into ``--out`` and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

CLASSES = [
    ("visual", "boxed"),
    ("visual", "outside"),
    ("echoed", "boxed"),
    ("echoed", "outside"),
    ("format", "outside"),
    ("other", "outside"),
]
RHO = {"relative": 0.5, "raw": 0.5, "kl_shift": 0.5, "entropy": 0.2}


def _label(c):
    return f"{c[0]} ({'in' if c[1] == 'boxed' else 'outside'} box)" if c[0] in ("visual", "echoed") else c[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="default: the bundled demo model")
    ap.add_argument("--n", type=int, default=400, help="test items")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--draws", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--perturbations", nargs="+", default=None, help="default: every removing entry")
    ap.add_argument("--out", default="runs/detect-evidence")
    args = ap.parse_args(argv)

    import torch

    from cppo.detect import Example, PerceptionDetector
    from cppo.detect.evidence import token_classes
    from cppo.grading import grade
    from cppo.models import demo_model_path, load_model_and_processor
    from cppo.perturb import list_perturbations
    from cppo.rl.data import open_dataset
    from cppo.toy import export_shapes_dataset

    torch.set_num_threads(2)
    model_path = args.model or str(demo_model_path())
    model, processor = load_model_and_processor(model_path)
    perturbations = args.perturbations or list_perturbations(kind="removing")
    with tempfile.TemporaryDirectory() as tmp:
        paths = export_shapes_dataset(tmp, n_train=0, n_val=0, n_test=args.n, seed=0)
        ds = open_dataset(paths["test"])
        samples = [ds[i] for i in range(len(ds))]
    t0 = time.time()
    kw = dict(draws=args.draws, batch_size=args.batch_size, seed=args.seed, compute_kl=True)
    gen = PerceptionDetector(model, processor, max_new_tokens=args.max_new_tokens, **kw)
    first = gen.detect([Example(s.images, s.question) for s in samples], progress=True)
    responses = [d.token_ids for d in first]
    acc = [grade(d.response_text, s.answer) for d, s in zip(first, samples)]
    accuracy = sum(a for a, _ in acc) / len(acc)
    fmt = sum(f for _, f in acc) / len(acc)
    print(f"{len(samples)} responses: accuracy {accuracy:.3f}, format {fmt:.3f}", file=sys.stderr)
    classes = [token_classes(d.token_texts, s.question) for d, s in zip(first, samples)]
    flat_cls = [c for cs in classes for c in cs]
    n_all = len(flat_cls)
    base = {c: sum(x == c for x in flat_cls) / n_all for c in CLASSES}

    results = {
        "model": model_path,
        "n": len(samples),
        "accuracy": accuracy,
        "format": fmt,
        "draws": args.draws,
        "seed": args.seed,
        "tokens": n_all,
        "base_share": {},
        "perturbations": {},
    }
    results["base_share"] = {_label(c): base[c] for c in CLASSES}
    for name in perturbations:
        det = PerceptionDetector(model, processor, perturbation=name, **kw)
        ex = [Example(s.images, s.question, ids) for s, ids in zip(samples, responses)]
        dets = det.detect(ex, progress=True)
        shifts = defaultdict(list)
        for d, cs in zip(dets, classes):
            for t, c in enumerate(cs):
                shifts[c].append(float(d.shift[t]))
        all_shift = [x for v in shifts.values() for x in v]
        entry = {
            "mean_shift": {
                _label(c): (sum(shifts[c]) / len(shifts[c]) if shifts[c] else None) for c in CLASSES
            },
            "count": {_label(c): len(shifts[c]) for c in CLASSES},
            "mean_shift_all": sum(all_shift) / len(all_shift),
            "selectors": {},
        }
        for sel, rho in RHO.items():
            picked = defaultdict(int)
            total = 0
            for d, cs in zip(dets, classes):
                _, mask = d.select(sel, rho)
                for t in mask.nonzero().flatten().tolist():
                    picked[cs[t]] += 1
                    total += 1
            share = {_label(c): picked[c] / max(total, 1) for c in CLASSES}
            vis = sum(picked[c] for c in CLASSES if c[0] == "visual") / max(total, 1)
            vis_base = sum(base[c] for c in CLASSES if c[0] == "visual")
            ans = sum(picked[c] for c in CLASSES if c[0] in ("visual", "echoed")) / max(total, 1)
            ans_base = sum(base[c] for c in CLASSES if c[0] in ("visual", "echoed"))
            entry["selectors"][sel] = {
                "rho": rho,
                "selected": total,
                "share": share,
                "visual_share": vis,
                "visual_enrichment": vis / vis_base,
                "answer_share": ans,
                "answer_enrichment": ans / ans_base,
            }
        results["perturbations"][name] = entry
        print(f"{name}: done ({time.time() - t0:.0f} s)", file=sys.stderr)
    results["seconds"] = round(time.time() - t0, 1)

    vis_base = sum(base[c] for c in CLASSES if c[0] == "visual")
    ans_base = sum(base[c] for c in CLASSES if c[0] in ("visual", "echoed"))
    md = [
        f"Model `{model_path}`, {len(samples)} shapes test items, one sampled response each "
        f"(accuracy {accuracy:.1%}, format {fmt:.1%}), {n_all} response tokens, {args.draws} draw(s), "
        f"seed {args.seed}.",
        "",
        "Mean shift dH = H(I-) - H(I) in nats (token count in the header):",
        "",
    ]
    counts = results["perturbations"][perturbations[0]]["count"]
    md.append(
        "| removing view | "
        + " | ".join(f"{_label(c)} (n={counts[_label(c)]})" for c in CLASSES)
        + " | all |"
    )
    md.append("|---|" + "---:|" * (len(CLASSES) + 1))
    for name, e in results["perturbations"].items():
        cells = [
            f"{e['mean_shift'][_label(c)]:+.4f}" if e["mean_shift"][_label(c)] is not None else "-"
            for c in CLASSES
        ]
        md.append(f"| `{name}` | " + " | ".join(cells) + f" | {e['mean_shift_all']:+.4f} |")
    md += [
        "",
        "Share of selected tokens that are answer-bearing (visual + echoed) and visual alone; the "
        "enrichment is the share divided by the share among all response tokens "
        f"(answer-bearing {ans_base:.1%}, visual {vis_base:.1%}); "
        "format share for comparison:",
        "",
    ]
    md.append(
        "| removing view | selector (rho) | selected | answer-bearing share | × | visual share | × | "
        "format share |"
    )
    md.append("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, e in results["perturbations"].items():
        for sel, s in e["selectors"].items():
            if sel == "entropy" and name != perturbations[0]:
                continue
            label = "(any)" if sel == "entropy" else f"`{name}`"
            md.append(
                f"| {label} | {sel} ({s['rho']}) | {s['selected']} | {s['answer_share']:.1%} | "
                f"{s['answer_enrichment']:.2f} | {s['visual_share']:.1%} | {s['visual_enrichment']:.2f} | "
                f"{s['share']['format']:.1%} |"
            )
    text = "\n".join(md) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "evidence.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "evidence.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
