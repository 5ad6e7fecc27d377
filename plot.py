r"""
Plots: training curves from metrics.jsonl files, and the reward-KL frontier of a study.

    python plot.py curves out/dpo/metrics.jsonl out/ppo/metrics.jsonl --keys loss eval/gold_reward \
        --out curves.png
    python plot.py frontier out/study/results.json --out frontier.png

matplotlib is imported here only, and only when drawing, so everything else runs without it.
"""
import argparse
import difflib
import json
import os
import sys


def _pyplot():
    """matplotlib.pyplot, or None with a one-line hint when it is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("plot: matplotlib is not installed (pip install matplotlib); tables are written, figures "
              "are not", file=sys.stderr)
        return None


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def smoothed(values: list[float], alpha: float) -> list[float]:
    """Exponential moving average, debiased as in Adam, so the first points are not pulled to 0."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = alpha * avg + (1 - alpha) * v
        out.append(avg / (1 - alpha ** i))
    return out


def draw_curves(ax, series: list[tuple[str, list[dict]]], key: str, smooth: float) -> None:
    for label, rows in series:
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            steps, values = zip(*points)
            ax.plot(steps, smoothed(list(values), smooth) if smooth else values, label=label)
    ax.set_title(key)
    ax.set_xlabel("step")


def warn_missing_keys(path: str, rows: list[dict], keys: list[str]) -> None:
    """One line on stderr for each key in none of a metrics file's rows, naming the file and a
    few keys it does have (the closest spellings first), so a mistyped key is not a blank panel."""
    have = sorted({k for r in rows for k in r} - {"step"})
    for key in keys:
        if not any(key in r for r in rows):
            close = difflib.get_close_matches(key, have, n=4, cutoff=0.5)
            shown = (close + [k for k in have if k not in close])[:4]
            more = ", ..." if len(have) > len(shown) else ""
            print(f"plot: no {key!r} in any row of {path}; it has {', '.join(shown) or 'no metrics'}{more}",
                  file=sys.stderr)


def curves(paths: list[str], keys: list[str], out: str, smooth: float = 0.0) -> None:
    """One panel per key, one line per metrics file; a key that a file lacks is named on stderr
    and the rest drawn."""
    metrics = [(p, read_metrics(p)) for p in paths]
    for path, rows in metrics:
        warn_missing_keys(path, rows, keys)
    plt = _pyplot()
    if plt is None:
        return
    series = [(os.path.basename(os.path.dirname(os.path.abspath(p))), rows) for p, rows in metrics]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        draw_curves(ax, series, key, smooth)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


METHOD_STYLE = {"DPO": "tab:blue", "PPO": "tab:orange", "PPO-GT": "tab:green", "RLOO": "tab:red",
                "RLOO-GT": "tab:pink", "GRPO": "tab:olive", "GRPO-GT": "tab:cyan", "online DPO": "navy",
                "online DPO-GT": "teal",
                "preferred-FT": "tab:purple", "best-of-N": "tab:brown", "SFT": "black", "optimal": "gray",
                "optimal (all prompts)": "silver"}


def frontier(results_json: str, out: str) -> None:
    """Left: gold reward (or the judge's score) against KL(pi || pi_ref), every run's path along training, the final
    points, best-of-N, and the optimal frontier, hollow where beyond its estimator's reach (seed
    0's runs when there are several seeds). Right: each method at matched KL (kl_matched.json
    beside results.json), the mean over seeds with its 95% interval."""
    plt = _pyplot()
    if plt is None:
        return
    with open(results_json) as f:
        rows = [r for r in json.load(f) if r["seed"] == 0]
    with open(os.path.join(os.path.dirname(results_json), "kl_matched.json")) as f:
        matched = json.load(f)
    study = os.path.join(os.path.dirname(results_json), "study.json")  # what scored it: the gold reward or a judge
    score = json.load(open(study))["score"] if os.path.exists(study) else "gold reward"
    fig, (ax, right) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    optimal = sorted((r["kl"], r["gold_reward"], r["reached"]) for r in rows if r["method"] == "optimal")
    if optimal:
        kl, gold, reached = zip(*optimal)
        ax.plot(kl, gold, color="gray", linestyle="--",
                label="optimal pi* (importance-weighted; hollow: beyond reach)")
        ax.scatter(kl, gold, s=16, color="gray", facecolors=["gray" if r else "none" for r in reached],
                   zorder=3)
    bon = [(r["kl"], r["gold_reward"]) for r in rows if r["method"] == "best-of-N"]
    if bon:
        ax.plot(*zip(*bon), color=METHOD_STYLE["best-of-N"], marker="s", markersize=4,
                label="best-of-N (KL bound)")
    labelled = set()
    for r in rows:
        if r["method"] == "best-of-N" or r["method"].startswith("optimal"):
            continue
        color = METHOD_STYLE.get(r["method"], "black")
        if r["path"]:
            ax.plot(*zip(*r["path"]), color=color, alpha=0.6, marker=".", markersize=4)
        ax.scatter([r["kl"]], [r["gold_reward"]], color=color, zorder=3, s=30,
                   label=r["method"] if r["method"] not in labelled else None)
        labelled.add(r["method"])
        ax.annotate(r["setting"].split("=")[-1] if r["method"] != "SFT" else "SFT",  # the knob's value
                    (r["kl"], r["gold_reward"]), fontsize=7, xytext=(3, -8), textcoords="offset points")
    # a run far past the compared KLs (GRPO at a small weight) leaves the frame
    ax.set_xlim(-0.3, min(ax.get_xlim()[1], 16))
    ax.set_xlabel("KL(pi || pi_SFT), nats per completion")
    ax.set_ylabel(f"mean {score} (held-out prompts)")
    ax.set_title("Paths along training and final points (seed 0; labels: beta, KL target or weight)",
                 fontsize=10)
    ax.legend(fontsize=7, loc="lower right", ncol=2)
    ax.grid(alpha=0.3)
    for i, m in enumerate(matched):  # methods side by side at each KL, so their intervals do not overlap
        cells = [(float(kl), c) for kl, c in m.items() if kl != "method" and c["gold_reward"] is not None]
        if not cells:
            continue
        x = [kl * (1 + 0.03 * (i - len(matched) / 2)) for kl, _ in cells]
        color = METHOD_STYLE.get(m["method"], "black")
        right.errorbar(x, [c["gold_reward"] for _, c in cells], yerr=[c["ci95"] or 0.0 for _, c in cells],
                       color=color, marker="o", markersize=4, capsize=2, lw=1,
                       linestyle="--" if m["method"].startswith("optimal") else "-", label=m["method"])
        hollow = [(xi, c["gold_reward"]) for xi, (_, c) in zip(x, cells) if c["beyond_reach"]]
        if hollow:
            right.scatter(*zip(*hollow), s=40, facecolors="white", edgecolors=color, zorder=3)
    right.set_ylim(*ax.get_ylim())  # one scale for both panels; a 2-seed interval may run off it
    right.set_xscale("log", base=2)
    right.set_xticks([1, 2, 4, 8], ["1", "2", "4", "8"])
    right.set_xlabel("KL(pi || pi_SFT) where the path first reaches it")
    right.set_title("At matched KL: mean over seeds, 95% interval (hollow: beyond reach)", fontsize=10)
    right.legend(fontsize=7, loc="lower right", ncol=2)
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def kl_traces(out_dir: str, out: str) -> None:
    """The adaptive controller at work: every seed's objective/kl (the rollouts' KL, which the
    controller reads) and kl_coef against the iteration, one panel per KL target, the target
    as a dashed line."""
    plt = _pyplot()
    if plt is None:
        return
    traces = {}  # target -> [(label, rows)]
    for seed_dir in sorted(d for d in os.listdir(out_dir) if d.startswith("seed")):
        for name in sorted(os.listdir(os.path.join(out_dir, seed_dir))):
            run = os.path.join(out_dir, seed_dir, name)
            if not os.path.exists(os.path.join(run, "config.json")):
                continue
            with open(os.path.join(run, "config.json")) as f:
                config = json.load(f)
            if config.get("adaptive_kl"):
                rows = read_metrics(os.path.join(run, "metrics.jsonl"))
                traces.setdefault(config["kl_target"], []).append((f"{seed_dir}/{name}", rows))
    if not traces:
        return
    fig, axes = plt.subplots(2, len(traces), figsize=(4 * len(traces), 6), squeeze=False)
    for col, target in enumerate(sorted(traces)):
        for label, rows in traces[target]:
            steps = [r["step"] for r in rows if "objective/kl" in r]
            axes[0][col].plot(steps, [r["objective/kl"] for r in rows if "objective/kl" in r], label=label,
                              lw=1)
            axes[1][col].plot(steps, [r["kl_coef"] for r in rows if "kl_coef" in r], label=label, lw=1)
        axes[0][col].axhline(target, color="black", linestyle="--", lw=1)
        axes[0][col].axhspan(0.75 * target, 1.25 * target, color="gray", alpha=0.15)
        axes[0][col].set_title(f"KL target {target:g}: objective/kl", fontsize=9)
        axes[1][col].set_title("kl_coef", fontsize=9)
        axes[1][col].set_yscale("log")
        axes[1][col].set_xlabel("iteration")
        axes[0][col].legend(fontsize=5)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def study_figures(out_dir: str) -> None:
    """frontier.png, kl_traces.png and curves.png of a compare.py study (curves: seed 0)."""
    frontier(os.path.join(out_dir, "results.json"), os.path.join(out_dir, "frontier.png"))
    kl_traces(out_dir, os.path.join(out_dir, "kl_traces.png"))
    plt = _pyplot()
    if plt is None:
        return
    root = os.path.join(out_dir, "seed0")
    runs = {name: read_metrics(os.path.join(root, name, "metrics.jsonl")) for name in sorted(os.listdir(root))
            if os.path.exists(os.path.join(root, name, "metrics.jsonl"))}
    panels = [("DPO", ("dpo",), ["loss", "rewards/accuracies"]),
              ("reward model", ("rm",), ["loss", "accuracy"]),
              ("PPO", ("ppo",), ["objective/scores", "objective/kl", "kl_coef"]),
              ("RLOO and GRPO", ("rloo", "grpo"), ["objective/scores", "objective/kl", "kl_coef"]),
              ("online DPO", ("online_dpo",), ["loss", "objective/scores", "objective/kl"])]
    fig, axes = plt.subplots(len(panels), 3, figsize=(13, 3.2 * len(panels)), squeeze=False)
    for row_axes, (title, prefix, keys) in zip(axes, panels):  # one row per method
        series = [(name, rows) for name, rows in runs.items() if name.startswith(prefix)]
        for ax, key in zip(row_axes, keys):
            draw_curves(ax, series, key, smooth=0.8)
            ax.set_title(f"{title}: {key}", fontsize=9)
            ax.legend(fontsize=6)
        for ax in row_axes[len(keys):]:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "curves.png"), dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("curves", help="metrics against step, one panel per key")
    c.add_argument("metrics", nargs="+", help="metrics.jsonl files, one line each in every panel")
    c.add_argument("--keys", nargs="+", default=["loss"], help="metric names, e.g. loss eval/gold_reward")
    c.add_argument("--smooth", type=float, default=0.0, help="exponential smoothing factor in [0, 1)")
    c.add_argument("--out", default="curves.png", help="image file to write")
    f = sub.add_parser("frontier", help="gold reward against KL from a compare.py results.json")
    f.add_argument("results", help="results.json written by compare.py")
    f.add_argument("--out", default="frontier.png", help="image file to write")
    args = parser.parse_args(argv)
    if args.command == "curves":
        curves(args.metrics, args.keys, args.out, args.smooth)
    else:
        frontier(args.results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
