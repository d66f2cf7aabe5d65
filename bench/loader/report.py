"""The bench's outputs: `latest.json` plus a timestamped copy, a console table, a PNG chart.

Every loader is set against the torch baseline of the same policy (rrc, paper or val) at all
cores, the pair its ratios compare; never against another policy's torch case."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from bench.figures import POLICIES, policy
from bench.peers import report as peers_report


def write_json(results: dict, out_dir: Path) -> tuple[Path, Path]:
    """Write `out_dir/latest.json` and `out_dir/bench-<created>.json`; return both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = results["created"].replace(":", "").replace("-", "")
    stamped = out_dir / f"bench-{stamp}.json"
    tmp = out_dir / ".latest.json.tmp"
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    shutil.copyfile(tmp, stamped)
    tmp.replace(out_dir / "latest.json")
    return out_dir / "latest.json", stamped


def rows(results: dict) -> list[tuple[str, str, dict]]:
    """(corpus, label, entry) for every timed source, in the order the table shows them; an
    entry holds "images_per_s" and, for sources timed in rounds, "cpu_ms_per_image"."""
    out = []
    for corpus, block in results["decode_bound"].items():
        out += [(corpus, name, entry) for name, entry in block["measured"].items()]
        out += [(corpus, f"loader: {name}", e) for name, e in results["loaders"].get(corpus, {}).items()]
        out += [(corpus, f"profile: {name}", e) for name, e in results["profile"].get(corpus, {}).items()]
    return out


def row_policy(label: str, entry: dict) -> str | None:
    """The policy of a row: a loader's graph, a profile line's crop ("rrc: ...", "paper: ..."),
    None for decoders and the profile's shared cuts."""
    if "kwargs" in entry:
        return policy(entry["kwargs"])
    cut = label.removeprefix("profile: ").split(":")[0]
    return cut if label.startswith("profile: ") and cut in POLICIES else None


def over_torch(results: dict, corpus: str, label: str, entry: dict) -> str:
    """images/s over the torch baseline of the same policy at all cores, as text ("" where none)."""
    torch_ = results["pairs"].get(corpus, {}).get(row_policy(label, entry), {}).get("torch")
    return f"{entry['images_per_s']['median'] / torch_['median']:.2f}" if torch_ else ""


def ratio_rows(ratios: dict) -> list[tuple[str, dict[str, str]]]:
    """(row name, {policy: ratio key}) for the ratio table: "dali_cpu_over_torch_paper" goes to
    row "dali_cpu_over_torch", column paper; the CPU-time twins make rows of their own."""
    out: dict[str, dict[str, str]] = {}
    for key, value in ratios.items():
        if isinstance(value, (dict, str)):
            continue
        base, twin = (key[:-len("_cpu_time")], "_cpu_time") if key.endswith("_cpu_time") else (key, "")
        pol = next((p for p in POLICIES[1:] if base.endswith(f"_{p}")), "rrc")
        base = base.removesuffix(f"_{pol}") if pol != "rrc" else base
        out.setdefault(base + twin, {})[pol] = key
    return list(out.items())


def table(results: dict) -> str:
    """The short console table: every figure (median, spread of rounds), CPU per image, and
    images/s against the torch baseline of the same policy at all cores."""
    lines = [f"{'corpus':<7} {'what':<46} {'images/s':>9} {'spread':>7} {'CPU ms/img':>10} {'x torch':>8}"]
    for corpus, label, entry in rows(results):
        fig = entry["images_per_s"]
        rel = over_torch(results, corpus, label, entry)
        cpu = f"{entry['cpu_ms_per_image']['median']:.2f}" if "cpu_ms_per_image" in entry else ""
        lines.append(f"{corpus:<7} {label:<46} {fig['median']:>9.1f} {fig['spread']:>6.0%} {cpu:>10} {rel:>8}")
    cores = results["machine"]["cores"]
    for corpus, block in results["decode_bound"].items():
        lines.append(f"{corpus:<7} {f'decode bound (best 1-thread decoder x {cores})':<46} {block['bound']:>9.1f} "
                     f"{'':>7} {block['cpu_ms_per_image']['median']:>10.2f}")
    for name, entry in results["end_to_end"].items():
        share = entry["data_wait_share"]
        lines.append(f"{'e2e':<7} {name + ': data-wait share':<46} {share['overall']:>9.1%} {share['spread']:>6.0%}"
                     f"   ({entry['images_per_s']:.1f} images/s training, step {entry['step_s']['median']:.2f} s)")
    lines += [f"rebuild {line}" for line in rebuild_lines(results.get("rebuild") or {})]
    lines.append(f"{'ratio':<7} {'(same policy both sides, all cores)':<46} " + " ".join(f"{p:>9}" for p in POLICIES))
    for row, keys in ratio_rows(results["ratios"]):
        cells = [results["ratios"][keys[p]] if p in keys else None for p in POLICIES]
        lines.append(f"{'ratio':<7} {row:<46} " + " ".join(f"{c if c is not None else 'n/a':>9}" for c in cells))
    lines += [f"s3      {line}" for line in staging_lines(results.get("staging") or {})]
    lines += [f"peers   {line}" for line in peers_report.lines(results)]
    return "\n".join(lines)


def rebuild_lines(rebuild: dict) -> list[str]:
    """What starting a pass costs, in words (empty when the run had none)."""
    if not rebuild:
        return []
    first, whole, batch = rebuild["first_batch_s"], rebuild["pass_s"], rebuild["batch_s"]
    out = [f"{rebuild['loader']}, {rebuild['passes']} passes back to back over {rebuild['tars']} tars "
           f"({rebuild['images_per_pass']} images, {rebuild['batches_per_pass']} batches of {rebuild['batch_size']}): "
           f"pass start to first batch {first['median']:.3f} s ({first['min']:.3f}-{first['max']:.3f}) over passes "
           f"2..{rebuild['passes']}, steady batch {batch['median']:.3f} s, whole pass {whole['median']:.2f} s",
           f"rebuild (first batch less a steady one) {rebuild['rebuild_s']:.3f} s = {rebuild['rebuild_share']:.1%} of "
           f"this pass; {rebuild['imagenet_epoch_share']:.4%} of an ImageNet epoch at the steady rate "
           f"({rebuild['steady_images_per_s']['median']:.0f} images/s, {rebuild['imagenet_epoch_s']:.0f} s)"]
    if "rss_growth_mib" in rebuild:
        out.append(f"RSS after pass 2: {rebuild['rss_after_pass_2_mib']} MiB, after pass {rebuild['passes']}: "
                   f"{rebuild['rss_after_last_mib']} MiB ({rebuild['rss_growth_mib']:+.1f} MiB; trend over passes "
                   f"2..{rebuild['passes']}: {rebuild['rss_slope_mib_per_pass']:+.1f} MiB per pass)")
    return out


def staging_lines(staging: dict) -> list[str]:
    """The object-storage figures in words (empty when the run had none)."""
    out = []
    remote = staging.get("remote_set") or staging
    if "stage_mb_per_s" in remote:
        out.append(f"staging into the node cache: {remote['stage_mb_per_s']} MB/s, {remote['stage_images_per_s']} "
                   f"images/s of shards ({remote['staged_bytes'] / 1e6:.1f} MB in {remote['stage_s']} s)")
    if "upload_mb_per_s" in staging:
        out.append(f"upload of the set: {staging['upload_mb_per_s']} MB/s")
    for key in ("staged_over_local", "streamed_over_local"):
        if key in staging:
            out.append(f"{key}: {staging[key]} (dali cpu rrc, all cores, same rounds)")
    return out


def markdown(results: dict) -> str:
    """The same figures as a Markdown table (written beside the JSON as `latest.md`, for docs)."""
    cores = results["machine"]["cores"]
    out = [f"`{results['command']}`, {results['created']}: {cores} cores ({results['machine']['cpu_model']}), "
           f"GPU: {results['machine']['gpu'] or 'none'}; batch {results['settings']['batch_size']}, crop "
           f"{results['settings']['crop_size']}, median of {results['settings']['repeats']} interleaved rounds "
           f"(min-max in brackets).", "",
           "| shard set | what | images/s | CPU ms per image | x torch, same policy, all cores (images/s) |",
           "|---|---|---:|---:|---:|"]
    for corpus, label, entry in rows(results):
        fig = entry["images_per_s"]
        rel = over_torch(results, corpus, label, entry)
        cpu = entry.get("cpu_ms_per_image")
        cpu_text = f"{cpu['median']:.2f} ({cpu['min']:.2f}-{cpu['max']:.2f})" if cpu else ""
        rate = f"{fig['median']:.0f} ({fig['min']:.0f}-{fig['max']:.0f})"
        out.append(f"| {corpus} | {label} | {rate} | {cpu_text} | {rel} |")
    for corpus, block in results["decode_bound"].items():
        out.append(f"| {corpus} | **decode bound** ({block['bound_from']}) | {block['bound']:.0f} | "
                   f"{block['cpu_ms_per_image']['median']:.2f} | |")
    out += ["", "| end to end | data-wait share of a step | step s | training images/s |", "|---|---:|---:|---:|"]
    for name, entry in results["end_to_end"].items():
        share = entry["data_wait_share"]
        out.append(f"| {name} | {share['overall']:.1%} ({share['min']:.1%}-{share['max']:.1%}) | "
                   f"{entry['step_s']['median']:.2f} | {entry['images_per_s']:.1f} |")
    ratios = results["ratios"]
    out += ["", "| ratio (same policy both sides, all cores) | rrc (default) | paper | val | target (rrc) |",
            "|---|---:|---:|---:|---:|"]
    for row, keys in ratio_rows(ratios):
        cells = [ratios[keys[p]] if p in keys else None for p in POLICIES]
        target = ratios["targets"].get(row.removesuffix("_cpu_time"), "")
        out.append(f"| `{row}` | " + " | ".join("n/a" if c is None else str(c) for c in cells) + f" | {target} |")
    pairs = results["pairs"].get(ratios["primary_corpus"], {})
    out += ["", f"Pairs compared on shard set {ratios['primary_corpus']}: " + "; ".join(
        f"{p}: {' vs '.join(e['name'] for e in pairs[p].values())}" for p in POLICIES if p in pairs) +
        "; the decode bound is the decoder alone on all cores, on the same (train) bytes."]
    if lines := rebuild_lines(results.get("rebuild") or {}):
        out += ["", "Starting a pass (what the train loader pays from `iter()` to its first batch, passes "
                "back to back):", ""] + [f"- {line}" for line in lines]
    if lines := staging_lines(results.get("staging") or {}):
        out += ["", "Object storage (local S3 server, `bench.loader.staging`):", ""] + [f"- {line}" for line in lines]
    out += peers_report.markdown(results)
    return "\n".join(out) + "\n"


def plot(results: dict, path: Path) -> Path:
    """A horizontal bar chart of every images/s figure (median, min-max whiskers), one panel
    per corpus, and the end-to-end data-wait shares."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    corpora = list(results["decode_bound"])
    peers = bool(results.get("peers"))
    panels = len(corpora) + (1 if results["end_to_end"] else 0) + peers
    per_panel = [[r for r in rows(results) if r[0] == c] for c in corpora]
    heights = [max(2.0, 0.32 * len(p) + 1.0) for p in per_panel] + ([2.0] if results["end_to_end"] else []) \
        + ([max(2.0, 0.5 * len(results.get("peers") or {}) + 1.0)] if peers else [])
    fig, axes = plt.subplots(panels, 1, figsize=(10, sum(heights)), gridspec_kw={"height_ratios": heights},
                             squeeze=False)
    colours = {"decode": "#888888", "loader": "#1f77b4", "profile": "#9ecae1"}
    for ax, corpus, entries in zip(axes[:, 0], corpora, per_panel):
        panel = [(c, label, e["images_per_s"]) for c, label, e in entries]
        labels = [label for _, label, _ in panel]
        med = [f["median"] for _, _, f in panel]
        err = [[f["median"] - f["min"] for _, _, f in panel], [f["max"] - f["median"] for _, _, f in panel]]
        cols = [colours["decode"] if name.startswith("decode") else
                "#d62728" if "dali" in name and name.startswith("loader") else
                colours["loader"] if name.startswith("loader") else colours["profile"] for name in labels]
        bound = results["decode_bound"][corpus]["bound"]
        # reading alone runs ~20x faster than decoding: clip its bars and print their value
        limit = 1.25 * max([bound] + [f["max"] for name, f in zip(labels, (f for _, _, f in panel))
                                      if not name.startswith("profile: read")])
        ax.barh(range(len(med)), med, xerr=err, color=cols, capsize=2)
        ax.set_xlim(0, limit)
        for y, m in enumerate(med):
            if m > limit:
                ax.text(limit * 0.99, y, f"{m:,.0f} →", va="center", ha="right", fontsize=7, color="white")
        # each DALI loader against the torch baseline of the same policy at all cores
        for y, (_, label, e) in enumerate(entries):
            if label.startswith("loader: dali") and (rel := over_torch(results, corpus, label, e)):
                ax.text(min(e["images_per_s"]["max"], limit * 0.8) + limit * 0.01, y, f"x{rel} torch (same policy)",
                        va="center", fontsize=6)

        ax.axvline(bound, color="k", ls="--", lw=1, label="decode bound (best per core x cores)")
        # the CPU cost per image, steady whatever the neighbours do, beside each name
        ticks = [f"{name}  [{e['cpu_ms_per_image']['median']:.2f} ms]" if "cpu_ms_per_image" in e else name
                 for name, (_, _, e) in zip(labels, entries)]
        ax.set_yticks(range(len(med)), ticks, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("images/s (median of rounds; whiskers min-max); [CPU ms per image]")
        ax.set_title(f"corpus {corpus}: {results['corpora'][corpus]['label']}", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    if peers:
        peers_report.plot_panel(axes[-1, 0], results)
    if results["end_to_end"]:
        ax = axes[len(corpora), 0]
        names = list(results["end_to_end"])
        shares = [results["end_to_end"][n]["data_wait_share"]["overall"] * 100 for n in names]
        ax.barh(range(len(names)), shares, color="#ff7f0e")
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(f"data-wait share of a training step, % ({results['settings']['e2e_model']}, "
                      f"crop {results['settings']['e2e_crop']}, {results['settings']['e2e_steps']} steps)")
    fig.suptitle(f"make bench, {results['created']}: {results['machine']['cores']} cores, "
                 f"{results['machine']['cpu_model']}, GPU: {results['machine']['gpu'] or 'none'}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
