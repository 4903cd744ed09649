"""The bench's outputs: a markdown table per model scale, the JSON, and two plots per scale
(decode tokens/s and TTFT per contender; size on disk against decode speed)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

FAMILY_COLOURS = {"torch": "#c44e52", "edge": "#4c72b0", "llama.cpp": "#55a868", "mtmd": "#8172b2"}
COLUMNS = ("contender", "load s", "image ms", "TTFT cold ms", "TTFT warm ms", "TTFT cached ms", "prefill tok/s",
           "decode tok/s",
           "roofline", "peak RSS MiB", "disk MiB", "accuracy %")


def _fmt(value, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def table_rows(result: dict) -> list[list[str]]:
    rows = []
    for r in result["contenders"]:
        if not r["rounds"]:
            rows.append([r["name"], f"failed: {r['errors'][0] if r['errors'] else '?'}"] + [""] * (len(COLUMNS) - 2))
            continue
        accuracy = f"{r['accuracy']:.1f} (n={r['accuracy_n']})" if r.get("accuracy") is not None else "-"
        rows.append([r["name"], _fmt(r["load_s"], 2), _fmt(r["image_encode_ms"]), _fmt(r["ttft_ms"]),
                     _fmt(r.get("ttft_warm_ms")), _fmt(r["ttft_cached_ms"]), _fmt(r["prefill_tokens_per_s"], 1),
                     _fmt(r["decode_tokens_per_s"], 1),
                     _fmt(r["roofline_fraction"], 2), _fmt(r["peak_rss_mb"]), _fmt(r["disk_bytes"] / 2**20, 1),
                     accuracy])
    return rows


def markdown_table(result: dict) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(result)]
    return "\n".join(lines)


def floors_table(result: dict) -> str:
    lines = ["| floor | measured | limit | met |", "|---|---|---|---|"]
    for f in result["floors"]:
        met = {True: "yes", False: "**no**", None: "not measured"}[f["met"]]
        sign = ">=" if f["at_least"] else "<="
        lines.append(f"| {f['floor']} | {_fmt(f['value'], 2)} | {sign} {f['limit']:g} | {met} |")
    return "\n".join(lines)


def section(result: dict) -> str:
    s = result["settings"]
    bw = result["bandwidth"]
    return "\n".join([
        f"### {result['scale']}",
        "",
        f"Model `{result['model']}`; {s['rounds']} interleaved round(s) x {s['prompts']} prompt(s), "
        f"{s['max_new_tokens']} new tokens, {s['n_threads']} threads, {s['image_tokens']} image tokens; "
        f"bandwidth {bw['bytes_per_s'] / 1e9:.1f} GB/s "
        + (f"(the fastest contender's decode; the probes read {bw['measured_bytes_per_s'] / 1e9:.1f}) "
           if bw.get("source") == "contender" else "")
        + f"({', '.join(format(m['bytes_per_s'] / 1e9, '.1f') + ' ' + m.get('probe', 'gemv') for m in bw['measurements'])} "
        f"GB/s before/after); "
        f"{result['seconds'] / 60:.1f} min.",
        "",
        markdown_table(result),
        "",
        floors_table(result),
        "",
    ])


def write_outputs(results: Sequence[dict], out_dir: str | os.PathLike, json_path: str | os.PathLike,
                  command: str, plots: bool = True) -> list[Path]:
    """docs-style outputs: `out_dir/bench-results.md`, `out_dir/bench-<scale>-*.png`, `json_path`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_file = Path(json_path)
    json_file.parent.mkdir(parents=True, exist_ok=True)
    json_file.write_text(json.dumps({"command": command, "results": list(results)}, indent=1) + "\n")
    written = [json_file]
    body = ["# Speed bench (generated)", "", f"Reproduce: `{command}`", ""]
    for result in results:
        body.append(section(result))
        if plots:
            for png in plot(result, out):
                body.append(f"![{png.stem}]({png.name})")
                written.append(png)
            body.append("")
    md = out / "bench-results.md"
    md.write_text("\n".join(body) + "\n")
    written.insert(0, md)
    return written


def plot(result: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["contenders"] if r["rounds"]]
    names = [r["name"] for r in rows]
    colours = [FAMILY_COLOURS.get(r["family"], "grey") for r in rows]
    scale = result["scale"]
    paths = []

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 0.45 * len(rows) + 1.8), sharey=True)
    ax1.barh(names, [r["decode_tokens_per_s"] or 0 for r in rows], color=colours)
    ax1.set_xlabel("decode tokens/s (higher is better)")
    roof = [r for r in rows if r.get("bytes_per_token")]
    for r in roof:
        ax1.plot(result["bandwidth"]["bytes_per_s"] / r["bytes_per_token"], r["name"], "k|", markersize=14)
    ax2.barh(names, [(r["ttft_ms"] or 0) / 1e3 for r in rows], color=colours)
    ax2.set_xlabel("cold time to first token, s (one image + question, nothing reused; lower is better)")
    ax1.invert_yaxis()
    fig.suptitle(f"{scale}: decode speed (| = memory roofline) and TTFT, medians")
    fig.tight_layout()
    paths.append(out / f"bench-{scale}-speed.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for r, colour in zip(rows, colours):
        if r["decode_tokens_per_s"] is None:
            continue
        ax.scatter(r["disk_bytes"] / 2**20, r["decode_tokens_per_s"], color=colour, s=40)
        ax.annotate(r["name"], (r["disk_bytes"] / 2**20, r["decode_tokens_per_s"]), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("files on disk, MiB (log)")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"{scale}: size vs decode speed")
    fig.tight_layout()
    paths.append(out / f"bench-{scale}-size.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths
