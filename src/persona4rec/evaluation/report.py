"""Report writer: ``results.json``, ``results.md`` and PNG plots in one folder."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

SUMMARY_METRICS = ("HR@10", "MRR@10", "NDCG@5", "NDCG@10", "NDCG@20")


def _fmt_ci(entry: dict[str, Any]) -> str:
    low, high = entry["ci95"]
    return f"{entry['mean']:.4f} [{low:.4f}, {high:.4f}]"


def _json_default(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot serialise {type(value).__name__}")


def _latency_for(report: dict[str, Any], method: str, setting: str) -> str:
    per_user = report.get("latency", {}).get("per_user", {})
    for key in (f"{method} {setting}", method):
        if key in per_user and (setting == "full" or key != method):
            return f"{per_user[key]['median_us']:.0f} / {per_user[key]['p95_us']:.0f}"
    return ""


def markdown_table(report: dict[str, Any]) -> str:
    """The main results table (test set, 95% bootstrap CIs) as Markdown."""
    lines = ["| method | setting | " + " | ".join(SUMMARY_METRICS) + " | valid NDCG@10 | latency µs (median / p95) |",
             "|---|---|" + "---|" * len(SUMMARY_METRICS) + "---|---|"]
    for m in report["methods"]:
        cells = [_fmt_ci(m["test"][k]) if "ci95" in m["test"][k] else f"{m['test'][k]['mean']:.4f}"
                 for k in SUMMARY_METRICS]
        name = m["method"] + (f" (alpha={m['params']['alpha']:.2f})" if "alpha" in m["params"] else "")
        if m.get("headline"):
            name = f"**{name}, chosen on validation**"
        lines.append(f"| {name} | {m['setting']} | " + " | ".join(cells) +
                     f" | {m['valid']['NDCG@10']:.4f} | {_latency_for(report, m['method'], m['setting'])} |")
    return "\n".join(lines)


def render_markdown(report: dict[str, Any]) -> str:
    d = report["dataset"]
    protocol = report["protocol"]
    if "users_with_last_two_on_the_same_timestamp" in d:
        ties = (f"{d['users_with_last_two_on_the_same_timestamp']} users have their last two reviews on the same "
                "timestamp. ")
    else:
        ties = ""
    no_cf = d.get("targets_no_cf_can_recommend")
    no_cf_line = (f"Targets whose item has no train interaction (no CF method can recommend them): "
                  f"{no_cf['valid']} of {protocol.get('valid_users', '?')} validation and {no_cf['test']} of "
                  f"{protocol.get('test_users', '?')} test targets. " if no_cf else "")
    out = [f"# Evaluation: {report['config']['dataset']}", "",
           f"{d['reviews']} reviews, {d['users']} users, {d['items']} items; {protocol['split']}; {ties}{no_cf_line}"
           "Test set; every choice was made on validation NDCG@10; the first row is the configuration chosen on "
           "validation. HR@10 and NDCG@10 show 95% bootstrap CIs over users.", "",
           f"Encoder: {json.dumps(report.get('encoder'))}", "",
           *([f"User-persona adapter `{report['config']['adapter_file']}`: profiles through `adapter.apply`; "
              f"personas and item vectors: {report['choices'].get('adapter', {}).get('item_side', '?')} "
              "(header in the choices below).", ""]
             if report["config"].get("adapter_file") else []),
           markdown_table(report), "",
           "## Rerank ceiling (first stage hit rate within its top-N)", "",
           "| N | valid | test |", "|---|---|---|"]
    for n, v in report["rerank_ceiling_hr"].items():
        out.append(f"| {n} | {v['valid']:.4f} | {v['test']:.4f} |")
    sizes = list(report["rerank_ceiling_hr"])
    out += ["", "Test hit rate of each first-stage candidate list (its rerank ceiling):", "",
            "| method | " + " | ".join(f"top-{n}" for n in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for method, rates in report.get("candidate_hit_rate", {}).items():
        out.append(f"| {method} | " + " | ".join(f"{rates[n]:.4f}" for n in sizes) + " |")
    out += ["", "## Paired bootstrap p-values (test NDCG@10; Holm-corrected over this family of comparisons)", "",
            "| A | B | mean A | mean B | p | p (Holm) |", "|---|---|---|---|---|---|"]
    for p in report["p_values"]:
        holm = f"{p['p_holm']:.4f}" if "p_holm" in p else ""
        out.append(f"| {p['a']} | {p['b']} | {p['mean_a']:.4f} | {p['mean_b']:.4f} | {p['p_value']:.4f} | {holm} |")
    out += ["", "## Scenarios (test NDCG@10)", ""]
    groups = list(report["scenarios"])
    out.append("| method | " + " | ".join(f"{g} (n={report['scenarios'][g]['users']})" for g in groups) + " |")
    out.append("|---|" + "---|" * len(groups))
    for key in report["scenarios"][groups[0]]["ndcg@10"]:
        out.append(f"| {key} | " + " | ".join(f"{report['scenarios'][g]['ndcg@10'][key]:.4f}" for g in groups) + " |")
    by_count = report.get("by_persona_count")
    if by_count:
        names = list(next(iter(by_count["by_target_persona_count"].values()))["ndcg@10"])
        out += ["", "## By the target item's persona count (test NDCG@10)", "",
                "Max-sim over more personas scores higher for the same user even when no persona fits better; "
                "the calibrated rows remove that drift (offsets measured on training data, temperature on "
                "validation).", "",
                "| personas | users | mean max-sim excess over the single vector | " + " | ".join(names) + " |",
                "|---|---|---|" + "---|" * len(names)]
        for c, g in by_count["by_target_persona_count"].items():
            excess = by_count["max_sim_excess_over_single_vector_by_count"].get(c, float("nan"))
            out.append(f"| {c} | {g['users']} | {excess:+.4f} | " +
                       " | ".join(f"{g['ndcg@10'][n]:.4f}" for n in names) + " |")
    agreement = report.get("recommender_agreement")
    if agreement:
        out += ["", f"Served by `Recommender.recommend` (the headline configuration): the same top-10 as measured "
                    f"for {agreement['same_top10']:.1%} of {agreement['users']} sampled test users (mean top-10 "
                    f"overlap {agreement['mean_top10_overlap']:.1%}); {agreement['note']}."]
    out += ["", "## Choices made on validation", "", "```json", json.dumps(report["choices"], indent=1), "```", "",
            f"Latency: {report['latency']['note']}.", "", "## Example users (fused rerank, matched persona)", ""]
    for ex in report["examples"]:
        out.append(f"**{ex['user_id']}** recently: " + "; ".join(h["title"][:60] for h in ex["recent_history"]) +
                   f". Held out: {ex['held_out']['title'][:60]}")
        out.append("")
        for r in ex["recommendations"]:
            mark = " **(held-out item)**" if r["is_held_out_item"] else ""
            why = f" — {r['rationale']}" if r.get("rationale") else ""
            out.append(f"{r['rank']}. {r['title'][:70]}{mark} — persona: \"{r['persona']}\"{why}")
        out.append("")
    out += ["## Timings (s)", "", "```json", json.dumps(report["timings_s"], indent=1), "```", ""]
    return "\n".join(out)


def write_plots(report: dict[str, Any], folder: Path) -> list[Path]:
    """NDCG@10 with CIs per method/setting, and median/p95 latency per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    methods = report["methods"]
    labels = [f"{m['method']} [{m['setting']}]" for m in methods]
    means = [m["test"]["NDCG@10"]["mean"] for m in methods]
    lows = [m["test"]["NDCG@10"]["mean"] - m["test"]["NDCG@10"]["ci95"][0] for m in methods]
    highs = [m["test"]["NDCG@10"]["ci95"][1] - m["test"]["NDCG@10"]["mean"] for m in methods]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(labels) + 1.5))
    ax.barh(range(len(labels)), means, xerr=[lows, highs], color="#4c72b0", capsize=3)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("test NDCG@10 (95% bootstrap CI)")
    ax.set_title(f"{report['config']['dataset']} ({report['protocol']['split']})", fontsize=9)
    fig.tight_layout()
    paths.append(folder / "ndcg10.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    latency = report["latency"]["per_user"]
    names = list(latency)
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(names) + 1.5))
    ax.barh(range(len(names)), [latency[n]["p95_us"] for n in names], color="#dd8452", label="p95")
    ax.barh(range(len(names)), [latency[n]["median_us"] for n in names], color="#4c72b0", label="median")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("online latency per user (µs, single thread, log scale)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(folder / "latency.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def write_report(report: dict[str, Any], folder: str | os.PathLike[str], plots: bool = True) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` and (``plots=True``) the PNGs; returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / "results.json", "markdown": folder / "results.md"}
    text = json.dumps(report, indent=1, default=_json_default, allow_nan=False) if _finite(report) else \
        json.dumps(report, indent=1, default=_json_default)
    paths["json"].write_text(text + "\n", encoding="utf-8")
    paths["markdown"].write_text(render_markdown(report), encoding="utf-8")
    if plots:
        for p in write_plots(report, folder):
            paths[p.stem] = p
    return paths


def _finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_finite(v) for v in value)
    return True
