"""Render a check report (the dict that becomes report.json) as Markdown, HTML with plots, and a terminal summary.

The report dict is the single source of truth: CheckResult.to_dict(), report.json, report.md, report.html and
the summary all come from it, so a report.json read back later renders the same way. Plots are drawn with
matplotlib's object API (`Figure`, Agg canvas) rather than pyplot: no global state, no display needed.
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path

from .fileio import atomic_dir, write_json

SCHEMA_VERSION = 3  # 2: accuracy in points with CI and McNemar, latency median/IQR, machine; 3: "original" → "source"
SIDES = ("source", "converted")  # the user's model and its conversion, in every table and plot


def write_report(report: dict, out_dir: str | os.PathLike) -> Path:
    """report.json, report.md, report.html and the PNG plots, all moved into `out_dir` at once."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        write_json(tmp / "report.json", report)
        images = {name: png for name, png in render_plots(report).items() if png}
        for name, png in images.items():
            (tmp / name).write_bytes(png)
        (tmp / "report.md").write_text(render_markdown(report, list(images)), encoding="utf-8")
        (tmp / "report.html").write_text(render_html(report, images), encoding="utf-8")
    return out_dir


# ----------------------------------------------------------------------------------------------- numbers → text

def _num(x, digits=4) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _points(x) -> str:
    """`x` already in points (percentage points of accuracy)."""
    return f"{x:+.2f} points"


def _ci(acc: dict) -> str:
    lo, hi = acc["ci95_points"]
    return f"{lo:+.2f} to {hi:+.2f} points"


def _ms(entry: dict) -> str:
    return f"{entry['median_ms']:.2f} ms" + (" (noisy)" if entry["noisy"] else "")


def _mb(n) -> str:
    return "—" if n is None else f"{n / 2 ** 20:.1f} MB"


def _millions(n) -> str:
    return f"{n / 1e6:.2f} M"


def verdict(report: dict) -> str:
    """The PASS/FAIL line. One-sided (default): only a drop beyond the tolerance fails; two-sided: |Δ|."""
    acc, tol = report["accuracy"], report["tolerance"]
    word = "PASS" if report["passed"] else "FAIL"
    if report["two_sided"]:
        rule = f"is {'within' if acc['within_tolerance'] else 'outside'} ±{tol:.2f} points"
    else:
        rule = (f"is within the allowed drop of {tol:.2f} points" if acc["within_tolerance"]
                else f"is a drop of more than {tol:.2f} points")
    return (f"{word}: accuracy difference {_points(acc['difference_points'])} (95% CI {_ci(acc)}; converted "
            f"{_num(acc['converted'])} vs source {_num(acc['source'])}) {rule}")


def _latency(report: dict, side: str, batch: int) -> dict | None:
    return next((x for x in report["models"][side]["latency"] if x["batch_size"] == batch), None)


def _batches(report: dict) -> list[int]:
    return [x["batch_size"] for x in report["models"]["source"]["latency"]]


# ----------------------------------------------------------------------------------------------- tables

def tables(report: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) for every table; Markdown and HTML both render these."""
    m, acc = report["models"], report["accuracy"]
    out = [("Accuracy", ["", *SIDES], [
        ["accuracy", _num(acc["source"]), _num(acc["converted"])],
        ["macro-F1", _num(m["source"]["macro_f1"]), _num(m["converted"]["macro_f1"])],
        ["difference (converted − source)", "", _points(acc["difference_points"])],
        ["95% CI of the difference (paired bootstrap)", "", _ci(acc)],
        [f"McNemar exact p ({acc['discordant']['source_only_correct']} texts only the source gets right, "
         f"{acc['discordant']['converted_only_correct']} only the converted)", "", f"{acc['mcnemar_p']:.3g}"],
        ["one text is worth", "", f"{acc['points_per_text']:.2f} points"],
        ["prediction agreement", "", _num(report["agreement"])],
    ])]
    per_class = []
    for o, c in zip(m["source"]["per_class"], m["converted"]["per_class"]):
        per_class.append([o["label"], str(o["support"])] + [_num(o[k], 3) for k in ("precision", "recall", "f1")]
                         + [_num(c[k], 3) for k in ("precision", "recall", "f1")])
    out.append(("Per class", ["label", "support", "source P", "source R", "source F1", "conv P", "conv R", "conv F1"],
                per_class))
    out.append(("Where they disagree most", ["source predicts", "converted predicts", "texts"],
                [[d["source"], d["converted"], str(d["count"])] for d in report["disagreements"]] or
                [["(none)", "", "0"]]))
    latency = []
    for b in _batches(report):
        ls, lc = _latency(report, "source", b), _latency(report, "converted", b)
        latency.append([str(b), str(ls["seq_len"])]
                       + [v for x in (ls, lc) for v in (_ms(x), _num(x["iqr_ms"], 2), str(x["measurements"]))]
                       + [f"{ls['throughput_per_s']:.1f}", f"{lc['throughput_per_s']:.1f}"])
    out.append((f"Latency (torch threads: {report['threads']}; {_machine(report)}; IQR over the measurements, "
                "noisy when above 20% of the median)",
                ["batch", "seq len", "source median", "source IQR ms", "source n", "conv median", "conv IQR ms",
                 "conv n", "source texts/s", "conv texts/s"], latency))
    so, sc = m["source"]["size"], m["converted"]["size"]
    out.append(("Size and memory", ["", *SIDES], [
        ["parameters", _millions(so["parameters"]), _millions(sc["parameters"])],
        ["file size (safetensors)", _mb(so["file_bytes"]), _mb(sc["file_bytes"])],
        ["peak forward memory (RSS)", _mb(so["forward_peak_rss_bytes"]), _mb(sc["forward_peak_rss_bytes"])],
    ]))
    sim = report["similarity"]
    n = max(len(sim["layer_cosine"]), len(sim["attention_js"]) + 1 if sim["attention_js"] else 0)
    rows = []
    for i in range(n):
        cos = sim["layer_cosine"][i] if i < len(sim["layer_cosine"]) else None
        mse = sim["layer_rel_mse"][i] if i < len(sim["layer_rel_mse"]) else None
        kl = sim["attention_kl"][i - 1] if 0 < i <= len(sim["attention_kl"]) else None
        js = sim["attention_js"][i - 1] if 0 < i <= len(sim["attention_js"]) else None
        rows.append(["embeddings" if i == 0 else str(i), _num(cos), _num(mse), _num(kl), _num(js)])
    out.append(("Layer similarity", ["layer", "hidden cosine", "hidden rel. MSE", "attention KL", "attention JS"],
                rows or [["(not comparable)", "", "", "", ""]]))
    inputs = report["inputs"]
    out.append(("Inputs and versions", ["", ""],
                [[k, str(v)] for k, v in inputs.items()] + [[k, str(v)] for k, v in report["versions"].items()]
                + [["machine " + k, str(v)] for k, v in report["machine"].items()]
                + [["threads", str(report["threads"])], ["latency method", report["latency_method"]],
                   ["accuracy interval", report["accuracy"]["ci_method"]],
                   ["memory method", report["memory_method"]]]))
    return out


def _machine(report: dict) -> str:
    m = report["machine"]
    return f"{m['processor']}, {m['cpu_count']} cores"


def render_markdown(report: dict, images: list[str]) -> str:
    lines = ["# mbconvert check", "", f"**{verdict(report)}**", ""]
    lines += [f"> **Warning:** {w}" for w in report["warnings"]] + ([""] if report["warnings"] else [])
    if report["similarity"].get("note"):
        lines += [f"> {report['similarity']['note']}", ""]
    for title, header, rows in tables(report):
        lines += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        lines.append("")
    lines += [f"![{name[:-4]}]({name})" for name in images]
    return "\n".join(lines) + "\n"


CSS = ("body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}"
       "table{border-collapse:collapse;margin-bottom:1.5rem}td,th{border:1px solid #ccc;padding:.25rem .6rem;"
       "text-align:right}td:first-child,th:first-child{text-align:left}.pass{color:#070}.fail{color:#b00}"
       "img{max-width:100%}")


def render_html(report: dict, images: dict[str, bytes]) -> str:
    """A single self-contained file: the PNGs are embedded as base64 data URIs."""
    e = html.escape
    cls = "pass" if report["passed"] else "fail"
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>mbconvert check</title>",
             f"<style>{CSS}</style></head><body><h1>mbconvert check</h1>", f"<p class='{cls}'><b>{e(verdict(report))}</b></p>"]
    parts += [f"<p class='fail'>Warning: {e(w)}</p>" for w in report["warnings"]]
    if report["similarity"].get("note"):
        parts.append(f"<p><i>{e(report['similarity']['note'])}</i></p>")
    for name, png in images.items():
        parts.append(f"<img alt='{e(name[:-4])}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>")
    for title, header, rows in tables(report):
        parts.append(f"<h2>{e(title)}</h2><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows]
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def render_summary(report: dict) -> str:
    """One screen for the terminal, ending with the PASS/FAIL line."""
    m, acc, inputs = report["models"], report["accuracy"], report["inputs"]
    row = "{:<24}{:>18}{:>18}"
    lines = [f"mbconvert check: {inputs['rows']} texts, sequence length {inputs['seq_len']}, "
             f"{report['threads']} threads on {_machine(report)}", row.format("", *SIDES),
             row.format("accuracy", _num(acc["source"]), _num(acc["converted"])),
             row.format("macro-F1", _num(m["source"]["macro_f1"]), _num(m["converted"]["macro_f1"]))]
    for b in _batches(report):
        ls, lc = _latency(report, "source", b), _latency(report, "converted", b)
        lines.append(row.format(f"latency b{b} median", _ms(ls), _ms(lc)))
        lines.append(row.format(f"throughput b{b}", f"{ls['throughput_per_s']:.0f}/s", f"{lc['throughput_per_s']:.0f}/s"))
    so, sc = m["source"]["size"], m["converted"]["size"]
    lines += [row.format("parameters", _millions(so["parameters"]), _millions(sc["parameters"])),
              row.format("file size", _mb(so["file_bytes"]), _mb(sc["file_bytes"])),
              row.format("peak forward memory", _mb(so["forward_peak_rss_bytes"]), _mb(sc["forward_peak_rss_bytes"]))]
    d = acc["discordant"]
    lines.append(f"accuracy difference {_points(acc['difference_points'])}, 95% CI {_ci(acc)}, McNemar p = "
                 f"{acc['mcnemar_p']:.3g} ({d['source_only_correct']} texts only the source gets right, "
                 f"{d['converted_only_correct']} only the converted)")
    top = ", ".join(f"{d['source']}→{d['converted']} ×{d['count']}" for d in report["disagreements"][:3])
    lines.append(f"agreement {100 * report['agreement']:.1f}%" + (f"; most often: {top}" if top else ""))
    sim = report["similarity"]
    if sim["layer_cosine"]:
        cos = sim["layer_cosine"]
        lines.append(f"hidden-state cosine per layer: min {min(cos):.3f}, last {cos[-1]:.3f}")
    if sim["attention_js"]:
        lines.append(f"attention JS divergence per layer: max {max(sim['attention_js']):.4f}")
    if sim.get("note"):
        lines.append(sim["note"])
    lines += [f"WARNING: {w}" for w in report["warnings"]]
    lines.append(verdict(report))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- plots

def render_plots(report: dict) -> dict[str, bytes | None]:
    """PNG bytes per plot name; None where there is nothing to draw (e.g. layers not comparable)."""
    return {"overview.png": _png(_overview, report), "per_class_f1.png": _png(_per_class, report),
            "similarity.png": _png(_similarity, report) if report["similarity"]["attention_js"]
            or report["similarity"]["layer_cosine"] else None}


def _png(draw, report: dict) -> bytes:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.4), dpi=90, layout="constrained")
    draw(fig, report)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


COLORS = {"source": "#4c72b0", "converted": "#dd8452"}


def _bars(ax, groups: list[str], values: dict[str, list[float]], title: str, ylabel: str) -> None:
    width = 0.38
    for k, side in enumerate(SIDES):
        xs = [i + (k - 0.5) * width for i in range(len(groups))]
        ax.bar(xs, values[side], width, label=side, color=COLORS[side])
    ax.set_xticks(range(len(groups)), groups)
    ax.set_title(title)
    ax.set_ylabel(ylabel)


def _overview(fig, report: dict) -> None:
    m = report["models"]
    ax_acc, ax_lat, ax_size = fig.subplots(1, 3)
    _bars(ax_acc, ["accuracy", "macro-F1"], {s: [m[s]["accuracy"], m[s]["macro_f1"]] for s in SIDES},
          "Accuracy", "")
    ax_acc.set_ylim(0, 1)
    fig.legend(*ax_acc.get_legend_handles_labels(), loc="outside lower center", ncols=2)
    batches = _batches(report)
    _bars(ax_lat, [f"batch {b}" for b in batches],
          {s: [_latency(report, s, b)["median_ms"] for b in batches] for s in SIDES}, "Median latency", "ms")
    _bars(ax_size, ["file MB", "params M"],
          {s: [m[s]["size"]["file_bytes"] / 2 ** 20, m[s]["size"]["parameters"] / 1e6] for s in SIDES}, "Size", "")


def _per_class(fig, report: dict) -> None:
    m = report["models"]
    ax = fig.subplots()
    labels = [c["label"] for c in m["source"]["per_class"]]
    _bars(ax, labels, {s: [c["f1"] for c in m[s]["per_class"]] for s in SIDES}, "Per-class F1", "F1")
    ax.set_ylim(0, 1)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside right upper")
    if len(labels) > 12:
        ax.tick_params(axis="x", labelrotation=90)


def _similarity(fig, report: dict) -> None:
    from matplotlib.ticker import MaxNLocator

    sim = report["similarity"]
    ax_hidden, ax_attn = fig.subplots(1, 2)
    for ax in (ax_hidden, ax_attn):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if sim["layer_cosine"]:
        ax_hidden.plot(range(len(sim["layer_cosine"])), sim["layer_cosine"], marker="o", label="cosine")
        ax_hidden.plot(range(len(sim["layer_rel_mse"])), sim["layer_rel_mse"], marker="s", label="relative MSE")
        ax_hidden.legend()
    ax_hidden.set_title("Hidden states, per layer (0 = embeddings)")
    ax_hidden.set_xlabel("layer")
    if sim["attention_js"]:
        layers = range(1, len(sim["attention_js"]) + 1)
        ax_attn.plot(layers, sim["attention_js"], marker="o", label="Jensen–Shannon")
        ax_attn.plot(layers, sim["attention_kl"], marker="s", label="KL(source ‖ converted)")
        ax_attn.legend()
    ax_attn.set_title("Head-averaged attention maps, per layer")
    ax_attn.set_xlabel("layer")


# ------------------------------------------------------------------ recovery summary
def format_duration(seconds: float) -> str:
    """6m41s, 42s, 1h02m."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def summary_line(summary: dict) -> str:
    """`accuracy 0.9772 vs source 0.9785 (−0.13 pt), 6m41s`."""
    took = format_duration(summary["wall_s"])
    if summary["final_accuracy"] is None:
        return f"recovered for {summary['steps']} steps, {took} (no eval data: accuracy not measured)"
    acc, source = summary["final_accuracy"], summary["source_accuracy"]
    diff = 100 * (acc - source)
    sign = "−" if diff < 0 else "+"
    return f"{summary['metric']} {acc:.4f} vs source {source:.4f} ({sign}{abs(diff):.2f} pt), {took}"


# ------------------------------------------------------------------ model card
def model_card(model, conversion: dict | None, recovery: dict | None, has_tokenizer: bool = True) -> str:
    """The output folder's README.md (a Hugging Face model card): what the model is, how it was made, what was
    measured. Built with huggingface_hub.ModelCard, from the reports only, so it is reproducible."""
    from huggingface_hub import ModelCard, ModelCardData

    c = model.config
    labels = [c.id2label[i] for i in sorted(c.id2label)]
    source = (conversion or {}).get("source", {})
    lines = [f"# MobileBERT text classifier ({c.num_labels} classes)", "",
             f"Converted by mbconvert from a {source.get('family', 'BERT-family')} model "
             f"(`{Path(str(source.get('path', '?'))).name}`: {source.get('num_hidden_layers', '?')} layers, hidden "
             f"{source.get('hidden_size', '?')}, {source.get('num_attention_heads', '?')} heads) into MobileBERT "
             f"(hidden {c.hidden_size}, bottleneck {c.intra_bottleneck_size}, {c.num_attention_heads} heads, "
             f"{c.num_feedforward_networks} FFNs, {c.normalization_type}), "
             f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters.", "",
             "```python", "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
             'model = AutoModelForSequenceClassification.from_pretrained("<this folder>")',
             'tokenizer = AutoTokenizer.from_pretrained("<this folder>")', "```", "",
             *([] if has_tokenizer else ["This folder has no tokenizer (the source had none beside it): add the "
                                         "source's tokenizer files before reading text.", ""]),
             "Labels: " + ", ".join(f"`{x}`" for x in labels), ""]
    if conversion:
        calib = conversion.get("calibration")
        lines += ["## Conversion", "", f"- calibration: {calib if isinstance(calib, str) else str(calib.get('texts')) + ' texts'}"]
        ev = conversion.get("evaluation")
        if ev:
            lines.append(f"- before recovery, agreement with the source on {ev['texts']} held-out texts: "
                         f"{ev['converted']['agreement']:.3f} (a random-init MobileBERT: {ev['random_init']['agreement']:.3f})")
        lines.append("")
    if recovery:
        lines += ["## Recovery", "", f"- {summary_line(recovery)} ({recovery['steps']} steps, "
                  f"{recovery['train_rows']} training rows, {recovery['eval_rows']} dev rows)"]
        if recovery.get("warning"):
            lines.append(f"- warning: {recovery['warning']}")
        lines.append("")
    lines += ["Accuracy on a test set: run `mbconvert check <this folder> --against <source> --data test.jsonl`.", ""]
    data = ModelCardData(library_name="transformers", pipeline_tag="text-classification",
                         tags=["mobilebert", "mbconvert", "text-classification"])
    template = "---\n{{ card_data }}\n---\n\n{{ body }}"
    return str(ModelCard.from_template(data, template_str=template, body="\n".join(lines)))
