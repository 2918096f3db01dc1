"""`neurolang report RUN`: tables and figures of a scan, in the spirit of the paper.

Writes RUN/report/report.md, RUN/report/index.html and RUN/report/*.png:
fig1 shared-neuron ratio and LAS against release date, fig3 against multilingual accuracy (with
Pearson and Spearman coefficients), fig2 fractions of language-related neurons per model and
language, fig4 ΔPPL when random / shared / exclusive neurons are deactivated, fig6 per-layer
distributions, and the QK / VO / FFN component tables (Tables 2, 6).
"""
import html
import math
from pathlib import Path

from neurolang.corpus import PAPER_LANGS
from neurolang.detect import SCORES_FILE, STATS_FILE, atomic_write_text
from neurolang.errors import NeurolangError
from neurolang.scan import read_json, read_table

REPORT_DIR = "report"


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise NeurolangError("figures need matplotlib: pip install 'neurolang[report]'") from None
    return plt


def correlations(x, y) -> dict | None:
    """Pearson and Spearman coefficients with p-values (None below three points)."""
    from scipy import stats

    pairs = [(a, b) for a, b in zip(x, y) if a is not None and b is not None
             and not (isinstance(a, float) and math.isnan(a)) and not (isinstance(b, float) and math.isnan(b))]
    if len(pairs) < 3 or len({a for a, _ in pairs}) < 2 or len({b for _, b in pairs}) < 2:
        return None
    xs, ys = zip(*pairs)
    pearson, spearman = stats.pearsonr(xs, ys), stats.spearmanr(xs, ys)
    return {"n": len(pairs), "pearson": float(pearson.statistic), "pearson_p": float(pearson.pvalue),
            "spearman": float(spearman.statistic), "spearman_p": float(spearman.pvalue)}


def _corr_text(c) -> str:
    if c is None:
        return "too few models for a correlation"
    return (f"Pearson r = {c['pearson']:.2f} (p = {c['pearson_p']:.2g}), "
            f"Spearman ρ = {c['spearman']:.2f} (p = {c['spearman_p']:.2g}), n = {c['n']}")


def _scatter(plt, path, xs, series, labels, families, xlabel, date_axis=False, intervals=None):
    """One panel per y series, each point labelled with its model and coloured by its family; the
    title holds the correlations. The LAS panel draws Imp = 1 (LAS = log 2) as Fig. 5 does, and
    `intervals` ({series: [(low, high) or None per model]}) as error bars."""
    fig, axes = plt.subplots(1, len(series), figsize=(5.5 * len(series), 4.2), squeeze=False)
    palette = {f: plt.get_cmap("tab10")(i % 10) for i, f in enumerate(dict.fromkeys(families))}
    notes = {}
    for ax, (name, ys) in zip(axes[0], series.items()):
        bounds = (intervals or {}).get(name) or [None] * len(ys)
        points = [(x, y, label, family, b) for x, y, label, family, b in zip(xs, ys, labels, families, bounds)
                  if x is not None and y is not None and not (isinstance(y, float) and math.isnan(y))]
        for x, y, label, family, b in points:
            ax.scatter(x, y, color=palette[family], label=family)
            if b is not None:
                ax.errorbar(x, y, yerr=[[y - b[0]], [b[1] - y]], color=palette[family], capsize=3, linewidth=1)
            ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if name == "LAS":
            ax.axhline(math.log(2), color="tab:red", linestyle="--", linewidth=1, label="Imp = 1 (LAS = log 2)")
        handles = dict(zip(*reversed(ax.get_legend_handles_labels())))  # one entry per family
        if len(handles) > 1:
            ax.legend(handles.values(), handles.keys(), fontsize=7)
        numeric = [x.toordinal() if date_axis else x for x, *_ in points]
        notes[name] = correlations(numeric, [y for _, y, *_ in points])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(name)
        ax.set_title(_corr_text(notes[name]), fontsize=8)
        if date_axis:
            fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return notes


def _dates(values):
    from datetime import date

    out = []
    for v in values:
        try:
            out.append(date.fromisoformat(str(v)[:10]) if v else None)
        except ValueError:
            out.append(None)
    return out


def _model_dirs(run_dir: Path, table):
    return {name: run_dir / name for name in table["model"]}


def _fractions_figure(plt, path, table, langs):
    import numpy as np

    models = list(table["model"])
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(models) * len(langs) / 3), 4.2))
    width = 0.8 / max(1, len(langs))
    for i, lang in enumerate(langs):
        shared = table["frac_shared"].fillna(0).to_numpy() * 100
        exclusive = table.get(f"frac_exclusive_{lang}", 0 * shared)
        exclusive = np.nan_to_num(np.asarray(exclusive, dtype=float)) * 100
        x = np.arange(len(models)) + i * width
        ax.bar(x, shared, width, color="tab:gray", label="shared" if i == 0 else None)
        ax.bar(x, exclusive, width, bottom=shared, label=f"exclusive {lang}")
    ax.set_xticks(np.arange(len(models)) + 0.4 - width / 2)
    ax.set_xticklabels(models, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("% of all neurons")
    ax.set_title("Language-related neurons per model and language (Fig. 2)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _delta_ppl_figure(plt, path, dirs):
    import numpy as np

    scored = {name: read_json(d / SCORES_FILE) for name, d in dirs.items() if (d / SCORES_FILE).is_file()}
    if not scored:
        return False
    fig, axes = plt.subplots(1, len(scored), figsize=(5.5 * len(scored), 4.2), squeeze=False)
    for ax, (name, scores) in zip(axes[0], scored.items()):
        langs = scores["langs"]
        sets = scores["sets"]
        bars = {"random (uniform)": [sets["random_uniform.shared"]["delta_ppl"][l] for l in langs],
                "shared": [sets["shared"]["delta_ppl"][l] for l in langs],
                "exclusive": [sets[f"exclusive.{l}"]["delta_ppl"][l] for l in langs]}
        x = np.arange(len(langs))
        for i, (label, values) in enumerate(bars.items()):
            ax.bar(x + (i - 1) * 0.27, [max(v, 1e-3) for v in values], 0.27, label=label)
        ax.set_yscale("log")
        ax.set_xticks(x)
        ax.set_xticklabels(langs)
        ax.set_title(f"{name}: ΔPPL when deactivated (Fig. 4)", fontsize=9)
        ax.set_ylabel("ΔPPL (log scale; ≤ 0 drawn at 1e-3)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _layers_figure(plt, path, dirs):
    stats = {name: read_json(d / STATS_FILE) for name, d in dirs.items() if (d / STATS_FILE).is_file()}
    if not stats:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, s in stats.items():
        n = s["n_layers"]
        depth = [(i + 0.5) / n for i in range(n)]
        for ax, kind in zip(axes, ("shared", "exclusive")):
            ax.plot(depth, [100 * v for v in s["layers"]["per_layer"][kind]], marker=".", label=name)
    for ax, kind in zip(axes, ("shared", "exclusive")):
        ax.set_xlabel("relative layer depth")
        ax.set_ylabel(f"% of the layer's neurons that are {kind}")
        ax.set_title(f"{kind} neurons by layer (Fig. 6, 7)", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _component_rows(dirs):
    rows = []
    for name, d in dirs.items():
        if not (d / STATS_FILE).is_file():
            continue
        comps = read_json(d / STATS_FILE)["components"]
        for kind in ("shared", "exclusive", "unique"):
            shares = comps.get(kind) or {}
            rows.append([name, kind] + [f"{100 * shares[c]:.1f}" if c in shares else "–" for c in ("QK", "VO", "FFN")])
    return rows


def _stage_rows(dirs):
    """Mean % of a layer's neurons in each set, per layer stage (Tables 3, 5)."""
    rows = []
    for name, d in dirs.items():
        stats = read_json(d / STATS_FILE)
        if stats is None:
            continue
        for stage, bounds in stats["layers"]["stage_bounds"].items():
            values = stats["layers"]["stages"][stage]
            label = f"{stage} ({bounds[0]}–{bounds[1]})" if bounds else stage
            rows.append([name, label] + [_fmt(None if values[k] is None else 100 * values[k])
                                         for k in ("unique", "shared", "exclusive")])
    return rows


def _unique_rows(dirs, langs):
    """% of all neurons that are strictly unique to each language (Table 4)."""
    rows = []
    for name, d in dirs.items():
        stats = read_json(d / STATS_FILE)
        if stats is not None:
            fractions = stats["fractions"]
            rows.append([name] + [_fmt(100 * fractions[lang]["unique"]) if lang in fractions else "–" for lang in langs])
    return rows


def _md_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(header, rows) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(value, digits=3):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def report(run_dir) -> Path:
    """Write the report of a scan; returns the Markdown file's path."""
    plt = _plt()
    run_dir = Path(run_dir)
    table = read_table(run_dir)
    if table.empty:
        raise NeurolangError(f"{run_dir} has no scanned models yet")
    out = run_dir / REPORT_DIR
    out.mkdir(exist_ok=True)
    dirs = _model_dirs(run_dir, table)
    langs = sorted({c[len("frac_language_"):] for c in table.columns if c.startswith("frac_language_")},
                   key=lambda l: (PAPER_LANGS.index(l) if l in PAPER_LANGS else len(PAPER_LANGS), l))
    sections, figures, notes = [], [], {}
    labels = list(table["model"])
    families = [f if isinstance(f, str) and f else "model" for f in table.get("family", [None] * len(table))]

    summary_cols = ["model", "family", "size", "release_date", "status", "n_shared", "shared_ratio", "las", "las_low",
                    "las_high", "stage"]
    summary_cols += [c for c in table.columns if c.startswith("imp_") or c.startswith("acc_")]
    summary_cols += [c for c in table.columns if c.startswith("seconds_")]
    summary_cols = [c for c in summary_cols if c in table.columns]
    rows = [[_fmt(v) for v in r] for r in table[summary_cols].itertuples(index=False)]
    sections.append(("Results (one row per model)", summary_cols, rows))
    errors = [[r.model, r.error] for r in table.itertuples() if isinstance(r.error, str)]
    if errors:
        sections.append(("Models that failed", ["model", "error"], errors))

    if "shared_ratio" in table.columns:
        dates = _dates(table["release_date"]) if "release_date" in table.columns else [None] * len(table)
        y = {"shared neuron ratio": list(table["shared_ratio"]),
             "LAS": list(table["las"]) if "las" in table.columns else [None] * len(table)}
        las_bounds = {"LAS": [None if lo is None or math.isnan(lo) else (lo, hi)
                              for lo, hi in zip(table["las_low"], table["las_high"])]} if "las_low" in table.columns else None
        if sum(d is not None for d in dates) >= 2:
            notes["release_date"] = _scatter(plt, out / "fig1_vs_release_date.png", dates, y, labels, families,
                                             "release date", date_axis=True, intervals=las_bounds)
            figures.append(("fig1_vs_release_date.png", "Shared-neuron ratio and LAS against release date (Fig. 1, 5)"))
        acc_cols = [c for c in table.columns if c.startswith("acc_") and c.endswith("_avg")]
        for col in acc_cols:
            name = f"fig3_vs_{col}.png"
            notes[col] = _scatter(plt, out / name, list(table[col]), y, labels, families, f"{col} (%)",
                                  intervals=las_bounds)
            figures.append((name, f"Shared-neuron ratio and LAS against multilingual accuracy {col} (Fig. 3)"))
        _fractions_figure(plt, out / "fig2_fractions.png", table, langs)
        figures.append(("fig2_fractions.png", "Shared and exclusive neurons as % of all neurons (Fig. 2)"))
    if _delta_ppl_figure(plt, out / "fig4_delta_ppl.png", dirs):
        figures.append(("fig4_delta_ppl.png", "ΔPPL with random, shared and exclusive neurons deactivated (Fig. 4)"))
    if _layers_figure(plt, out / "fig6_layers.png", dirs):
        figures.append(("fig6_layers.png", "Per-layer distribution of shared and exclusive neurons (Fig. 6, 7)"))
    comp = _component_rows(dirs)
    if comp:
        sections.append(("Component shares, % of each set (Tables 2, 6)", ["model", "set", "QK", "VO", "FFN"], comp))
    stage_rows = _stage_rows(dirs)
    if stage_rows:
        sections.append(("Layer stages, mean % of a layer's neurons (Tables 3, 5)",
                         ["model", "layers", "unique", "shared", "exclusive"], stage_rows))
    unique_rows = _unique_rows(dirs, langs)
    if unique_rows:
        sections.append(("Strictly unique neurons, % of all neurons (Table 4)", ["model"] + langs, unique_rows))
    corr_rows = [[x, y, _corr_text(c)] for x, per in notes.items() for y, c in per.items()]
    if corr_rows:
        sections.append(("Correlations", ["against", "quantity", "coefficients"], corr_rows))

    md = [f"# neurolang scan report: {run_dir.name}", ""]
    page = [f"<!doctype html><meta charset='utf-8'><title>neurolang: {html.escape(run_dir.name)}</title>",
            "<style>body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse;"
            "font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}img{max-width:100%}</style>",
            f"<h1>neurolang scan report: {html.escape(run_dir.name)}</h1>"]
    for title, header, rows in sections:
        md += [f"## {title}", "", _md_table(header, rows), ""]
        page += [f"<h2>{html.escape(title)}</h2>", _html_table(header, rows)]
    for name, caption in figures:
        md += [f"## {caption}", "", f"![{caption}]({name})", ""]
        page += [f"<h2>{html.escape(caption)}</h2>", f"<img src='{name}' alt='{html.escape(caption)}'>"]
    atomic_write_text("\n".join(md) + "\n", out / "report.md")
    atomic_write_text("\n".join(page) + "\n", out / "index.html")
    return out / "report.md"
