"""The peers in the bench's outputs: console lines, a Markdown table for latest.md (and
docs/BENCHMARKS.md), and a panel of the bench plot."""
from __future__ import annotations


def _fig(entry: dict, split: str, key: str = "images_per_s") -> dict:
    return entry["figures"][split][key]


def _mad(entry: dict, which: str) -> str:
    m = entry.get("val_vs_pil", {}).get(which)
    return "" if not m or m["mad_pixel_levels"] is None else f"{m['mad_pixel_levels']:.2f}"


def _over(run: dict, name: str, key: str) -> str:
    value = run.get("dali_over", {}).get(name, {}).get(key)
    return "1" if name == "dali" else "" if value is None else f"{value:.2f}"


def rows(results: dict) -> list[dict]:
    """One row per measured loader, in the order they were timed."""
    peers, run = results.get("peers") or {}, results.get("peers_run") or {}
    out = []
    for name, e in peers.items():
        out.append({
            "loader": name, "version": e["version"],
            "train": _fig(e, "train"), "val": _fig(e, "val"),
            "train_cpu_ms": _fig(e, "train", "cpu_ms_per_image")["median"],
            "val_cpu_ms": _fig(e, "val", "cpu_ms_per_image")["median"],
            "rss": e["peak_rss_mb"],
            "over_train": _over(run, name, "train"), "over_val": _over(run, name, "val"),
            "over_train_cpu": _over(run, name, "train_cpu_time"), "over_val_cpu": _over(run, name, "val_cpu_time"),
            "samples": f"{e['samples_per_epoch']['train']} / {e['samples_per_epoch']['val']}",
            "mad": " / ".join(x for x in (_mad(e, "stored_set"), _mad(e, "resized_set")) if x),
        })
    return out


def notes(results: dict) -> list[str]:
    """The run's facts in words: installs, skipped peers, packing, checks, the target."""
    run = results.get("peers_run") or {}
    if not run:
        return []
    out = [f"{name}: {how}" for name, how in run["installs"].items()]
    out += [f"{name}: not measured: {why}" for name, why in run["skipped"].items()]
    if pack := run.get("litdata_pack"):
        out.append(f"litdata optimize() (packing cost, not in the loader's rate): {pack['images']} images in "
                   f"{pack.get('seconds', '?')} s with {pack.get('workers', '?')} workers "
                   f"({pack.get('images_per_s', '?')} images/s, {pack['bytes'] / 1e6:.1f} MB in "
                   f"{pack['chunks']} chunks)")
    same = run["same_samples"]
    out.append("samples per epoch: " + "; ".join(
        f"{split} {'the same for all' if same[split]['same'] else 'DIFFER'} "
        f"({', '.join(f'{k} {v}' for k, v in same[split]['samples'].items())})" for split in same))
    for split, best in run.get("best_peer", {}).items():
        if best:
            r = run["dali_over_best_peer"][split]
            out.append(f"{split}: best peer {best}; DALI CPU / {best} = {r:.2f} (target {run['target']}: "
                       f"{'met' if run['target_met'][split] else 'not met'})")
    return out


def lines(results: dict) -> list[str]:
    """Console lines of the peers (empty without them)."""
    table = rows(results)
    if not table:
        return []
    out = [f"{'loader':<18} {'train img/s':>11} {'val img/s':>9} {'CPU ms tr':>9} {'CPU ms val':>10} "
           f"{'RSS MiB':>8} {'DALI/x tr':>9} {'DALI/x val':>10} {'MAD vs PIL':>12}"]
    for r in table:
        out.append(f"{r['loader']:<18} {r['train']['median']:>11.1f} {r['val']['median']:>9.1f} "
                   f"{r['train_cpu_ms']:>9.2f} {r['val_cpu_ms']:>10.2f} {r['rss']:>8.0f} {r['over_train']:>9} "
                   f"{r['over_val']:>10} {r['mad']:>12}")
    return out + notes(results)


def markdown(results: dict) -> list[str]:
    """The peers' Markdown table and notes (empty without them)."""
    table = rows(results)
    if not table:
        return []
    run = results["peers_run"]
    s = run["settings"]
    out = ["", f"Peers, side by side (`--peers`): shard set {run['shards_dir']}, batch {s['batch_size']}, crop "
           f"{s['crop_size']}, {run['cores']} threads/workers each, each loader in its own process, median of "
           f"{s['repeats']} interleaved rounds (min-max); train = rrc + flip + normalise, val = shorter side + "
           "centre crop, float32 CHW for all.", "",
           "| loader | version | train images/s | val images/s | CPU ms/image train / val | peak RSS MiB | "
           "DALI / loader train / val | same in CPU time | samples/epoch train / val | val MAD vs PIL "
           "(stored / resized set) |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in table:
        t, v = r["train"], r["val"]
        out.append(f"| {r['loader']} | {r['version']} | {t['median']:.0f} ({t['min']:.0f}-{t['max']:.0f}) | "
                   f"{v['median']:.0f} ({v['min']:.0f}-{v['max']:.0f}) | {r['train_cpu_ms']:.2f} / "
                   f"{r['val_cpu_ms']:.2f} | {r['rss']:.0f} | {r['over_train']} / {r['over_val']} | "
                   f"{r['over_train_cpu']} / {r['over_val_cpu']} | {r['samples']} | {r['mad']} |")
    return out + [""] + [f"- {n}" for n in notes(results)]


def plot_panel(ax, results: dict) -> None:
    """Train and val images/s of every loader (median, min-max whiskers), DALI in red."""
    table = rows(results)
    names = [r["loader"] for r in table]
    ys = range(len(names))
    for offset, split, colour in ((-0.2, "train", "#1f77b4"), (0.2, "val", "#9ecae1")):
        med = [r[split]["median"] for r in table]
        err = [[r[split]["median"] - r[split]["min"] for r in table], [r[split]["max"] - r[split]["median"]
                                                                        for r in table]]
        ax.barh([y + offset for y in ys], med, height=0.4, xerr=err, capsize=2,
                color=["#d62728" if n == "dali" else colour for n in names])
        for y, r in zip(ys, table):
            if r["loader"] != "dali" and r[f"over_{split}"]:
                ax.text(r[split]["max"] * 1.01, y + offset, f"DALI x{r[f'over_{split}']}", va="center", fontsize=6)
    ax.set_yticks(list(ys), [f"{r['loader']}  [{r['train_cpu_ms']:.2f} ms, {r['rss']:.0f} MiB]" for r in table],
                  fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("images/s, train (upper bar) and val (lower bar); [train CPU ms per image, peak RSS]")
    ax.set_title(f"peers side by side on {results['peers_run']['cores']} cores (each loader in its own process)",
                 fontsize=9)
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color="#d62728", label="DALI CPU (train, val)"), Patch(color="#1f77b4", label="train"),
                       Patch(color="#9ecae1", label="val")], fontsize=7, loc="lower right")
