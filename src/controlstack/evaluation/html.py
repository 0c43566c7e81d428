"""``report.html`` of ``controlstack evaluate``: one self-contained page (images inline as data URIs).

Sections: the reference points (each metric's ceiling and floor on the same real scenes), the
table of every row, plots (FID against CLIP score; each control type's fidelity per row; the
metrics against CFG when the grid has several), and one labelled grid per control type --
condition, real render, then every row's generation for the first scenes.
"""

from __future__ import annotations

import base64
import html
import io
import math

import numpy as np
from PIL import Image

from controlstack.evaluation.fidelity import LOWER_IS_BETTER, METRICS

STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}img{max-width:100%;image-rendering:pixelated}
.note{color:#666;font-size:13px}.warn{background:#fff4d6;border-left:4px solid #e0a800;padding:6px 10px}"""


def data_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _figure_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt  # local: heavy, only this path needs it

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return html.escape(str(v))


def label(row: dict) -> str:
    return f"{row['model']} / {row['control'] or 'none'} / {row['mode']} / cfg {row['cfg']:g} / {row['prompt_style']}"


def short_label(row: dict) -> str:
    return f"{row['model']} {row['mode']} {row['cfg']:g} {row['prompt_style']}"


def column(row: dict, key: str) -> str:
    """A fidelity key as a table column: a control row's ``edge_f1`` shares the column ``canny.edge_f1``
    with the no-control rows' baseline of the same measure."""
    return f"{row['control']}.{key}" if row["control"] and key in METRICS.get(row["control"], ()) else key


def table(rows: list[dict]) -> str:
    cells_of = [{column(r, k): v for k, v in r["fidelity"].items()} for r in rows]
    keys = sorted({k for c in cells_of for k in c}, key=lambda k: (k in ("tv", "asym", "nasym"), k))
    head = "".join(f"<th>{html.escape(k)}{' ↓' if k.split('.')[-1] in LOWER_IS_BETTER else ''}</th>" for k in keys)
    out = ["<table><tr><th class=l>model</th><th class=l>control</th><th class=l>mode</th><th>CFG</th>"
           f"<th class=l>prompt</th><th>FID ↓</th><th>KID ↓</th><th>CLIP score</th>{head}</tr>"]
    for r, values in zip(rows, cells_of):
        cells = "".join(f"<td>{_fmt(values.get(k))}</td>" for k in keys)
        out.append(f"<tr><td class=l>{_fmt(r['model'])}</td><td class=l>{_fmt(r['control'] or 'none')}</td>"
                   f"<td class=l>{_fmt(r['mode'])}</td><td>{r['cfg']:g}</td><td class=l>{r['prompt_style']}</td>"
                   f"<td>{_fmt(r['fid'])}</td><td>{_fmt(r['kid'])}</td><td>{_fmt(r['clip_score'])}</td>{cells}</tr>")
    return "\n".join(out) + "</table>"


def plots(report: dict) -> list[tuple[str, str]]:
    """(title, data URI) of each plot."""
    import matplotlib  # local: heavy, only this path needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # local: heavy, only this path needs it

    rows, ref = report["rows"], report["reference"]
    out = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        ax.scatter(r["clip_score"], r["fid"], s=30)
        ax.annotate(f"{r['control'] or 'none'}: {short_label(r)}", (r["clip_score"], r["fid"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    for name, v, style in (("real, own captions", ref["clip_real_matched"], "-"),
                           ("real, shuffled captions", ref["clip_real_shuffled"], ":")):
        ax.axvline(v, color="gray", linestyle=style, label=name)
    if not math.isnan(ref.get("fid_real_split", float("nan"))):
        ax.axhline(ref["fid_real_split"], color="green", linestyle="--", label="real vs real (split)")
    ax.set_xlabel("CLIP score (full caption) →")
    ax.set_ylabel("FID ↓")
    ax.legend(fontsize=7)
    out.append(("FID against CLIP score, every row", _figure_uri(fig)))

    controls = [c for c in dict.fromkeys(r["control"] for r in rows) if c]
    none_rows = [r for r in rows if r["control"] is None]
    for c in controls:
        metric = METRICS[c][0]
        mine = [r for r in rows if r["control"] == c]
        fig, ax = plt.subplots(figsize=(7, 0.35 * (len(mine) + len(none_rows)) + 1.2))
        labels = [short_label(r) for r in mine] + [f"no control {short_label(r)}" for r in none_rows]
        values = [r["fidelity"].get(metric, float("nan")) for r in mine] + \
                 [r["fidelity"].get(f"{c}.{metric}", float("nan")) for r in none_rows]
        ax.barh(range(len(values)), values, color=["C0"] * len(mine) + ["C7"] * len(none_rows))
        ax.set_yticks(range(len(values)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(f"{metric} {'↓' if metric in LOWER_IS_BETTER else '↑'}")
        out.append((f"{c}: condition fidelity per row (gray: no control)", _figure_uri(fig)))

    cfgs = sorted({r["cfg"] for r in rows})
    if len(cfgs) > 1:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        series: dict = {}
        for r in rows:
            series.setdefault((r["model"], r["control"] or "none", r["mode"], r["prompt_style"]), []).append(r)
        for key, rs in series.items():
            rs = sorted(rs, key=lambda r: r["cfg"])
            name = " / ".join(str(k) for k in key)
            axes[0].plot([r["cfg"] for r in rs], [r["fid"] for r in rs], marker="o", label=name)
            if key[1] != "none":
                m = METRICS[key[1]][0]
                axes[1].plot([r["cfg"] for r in rs], [r["fidelity"].get(m, float("nan")) for r in rs], marker="o",
                             label=f"{name} ({m})")
        axes[0].set(xlabel="CFG", ylabel="FID ↓")
        axes[1].set(xlabel="CFG", ylabel="condition fidelity")
        for a in axes:
            a.legend(fontsize=6)
        out.append(("FID and condition fidelity against CFG", _figure_uri(fig)))
    return out


def grids(report: dict, scenes: list[dict], images: list, grid_scenes: int) -> list[tuple[str, str]]:
    """One grid per control type: scenes down, condition | real | each row's image across.
    ``images[i]`` are the generations of ``report["rows"][i]``, one per scene."""
    from controlstack.io.png import make_labelled_grid  # local: heavy, only this path needs it

    rows = report["rows"]
    n = min(grid_scenes, len(scenes))
    out = []
    for c in dict.fromkeys(r["control"] for r in rows):
        mine = [(r, ims) for r, ims in zip(rows, images) if r["control"] == c]
        first = [] if c is None else ["condition"]
        columns = first + ["real"] + [short_label(r) for r, _ in mine]
        tiles = []
        for i in range(n):
            row_tiles = ([Image.fromarray(np.asarray(scenes[i][c])).convert("RGB")] if c else []) + \
                        [Image.fromarray(np.asarray(scenes[i]["image"]))] + \
                        [Image.fromarray(ims[i]) for _, ims in mine]
            tiles.append((f"scene {i}", row_tiles))
        out.append((f"{c or 'no control'}", data_uri(make_labelled_grid(tiles, columns))))
    return out


def write_report(report: dict, scenes: list[dict], images: list, path, grid_scenes: int = 4) -> None:
    """``report.html``: notes, reference points, the rows' table, plots and grids. ``images[i]``: the
    generations of ``report["rows"][i]``, so this page needs nothing of ``evaluate`` but its report."""
    from controlstack.evaluation.quality import (  # local: heavy, only this path needs it
        FID_SCENES_PER_FEATURE,
        KID_NOTE,
    )

    ref = report["reference"]
    cfg = report["config"]
    sample = report.get("sample", {})
    parts = [f"<!doctype html><html><head><meta charset=utf-8><title>controlstack evaluate</title>"
             f"<style>{STYLE}</style></head><body>",
             "<h1>controlstack evaluate</h1>",
             *[f"<p class=warn>{html.escape(n)}.</p>" for n in report.get("notes", []) if n != KID_NOTE],
             f"<p>{report['scenes']} held-out world scenes (from index {cfg['start']}) at {report['size']} px, "
             f"{cfg['steps']} {html.escape(cfg['scheduler'])} steps, sampling seeds {cfg['seed']}+i. Base: "
             f"{html.escape(cfg['base'] or 'the bundle')}. FID / KID features: {html.escape(report['networks']['features'])}; "
             f"CLIP: {html.escape(report['networks']['clip'])}.</p>",
             "<h2>Reference points</h2><table>",
             *[f"<tr><th class=l>{html.escape(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in ref.items()],
             "</table><p class=note>CLIP score of the real renders with their own captions (the ceiling) and with "
             "another scene's caption (chance); FID / KID between two halves of the real renders (what the same "
             "distribution scores at this set size); the real renders' total variation.</p>",
             (f"<p class=note>FID needs at least {sample.get('fid_min_scenes', '?')} scenes with this feature network "
              f"({FID_SCENES_PER_FEATURE} x its {sample.get('feature_dim', '?')} features: each half of the real-vs-real "
              f"split needs a full-rank covariance); below that its small-sample bias dominates. "
              f"{html.escape(KID_NOTE)}.</p>"),
             "<h2>Rows</h2>", table(report["rows"]),
             "<p class=note>Fidelity of no-control rows is measured for each control type of the grid "
             "(<code>type.metric</code>): the baseline a control must beat. tv: total variation of the images.</p>",
             "<h2>Plots</h2>"]
    parts += [f"<h3>{html.escape(t)}</h3><img src='{u}'>" for t, u in plots(report)]
    parts.append("<h2>Grids</h2>")
    parts += [f"<h3>{html.escape(t)}</h3><img src='{u}'>" for t, u in grids(report, scenes, images, grid_scenes)]
    parts.append("</body></html>")
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(parts))
    tmp.replace(path)
