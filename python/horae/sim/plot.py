"""Plots of a sweep: goodput against load, and KV-cache usage over time."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from horae.sim import SweepReport


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot_goodput(report: SweepReport, path: Path, title: Optional[str] = None) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    table = report.goodput_table()
    for s in report.schedulers:
        ax.plot(report.points, [table[p][s] for p in report.points], marker="o", label=s)
    ax.set_xlabel("request rate scale" if report.load == "rate_scale" else "concurrent clients")
    ax.set_ylabel("goodput (tokens/s meeting SLA)")
    sla = ", ".join(f"{k}<={v:g}s" for k, v in report.sla.items())
    return _finish(plt, fig, ax, title or f"goodput vs load ({sla})", path)


def plot_kv_usage(report: SweepReport, point: float, path: Path, title: Optional[str] = None) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for s in report.schedulers:
        steps = report.results[(point, s)].steps
        t, u = steps["time"], steps["kv_usage"]
        # Thin very long runs so the file stays small; the shape is what matters.
        stride = max(1, len(t) // 4000)
        ax.plot(t[::stride], u[::stride], label=s, linewidth=0.8)
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("KV blocks in use (fraction)")
    ax.set_ylim(0, 1.05)
    return _finish(plt, fig, ax, title or f"KV usage over time at {report.load} {point:g}", path)


def _finish(plt, fig, ax, title: str, path) -> Path:
    """Title, grid and legend, then write the figure and free it."""
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def _finish_grid(plt, fig, axes, path, ncol: int) -> List[Path]:
    """A grid of panels: one legend (the first panel's lines) below them, then write and free it."""
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [Path(path)]


def plot_report(report: SweepReport, out_dir: Path, prefix: str = "sim") -> List[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    heaviest = report.points[-1]
    paths = [plot_goodput(report, out / f"{prefix}_goodput.png")]
    # A cluster run (replicas=N) keeps no per-step series: one engine's KV usage is not the picture.
    if all("time" in report.results[(heaviest, s)].steps for s in report.schedulers):
        paths.append(plot_kv_usage(report, heaviest, out / f"{prefix}_kv_usage.png"))
    return paths


#: Line styles of the paper study's policies, in legend order.
PAPER_POLICIES = [
    ("oracle", "oracle (true lengths: the paper's live curves)", "k", ":"),
    ("past-future-warm", "Past-Future, warm start", "tab:blue", "-"),
    ("past-future", "Past-Future, cold start", "tab:blue", "--"),
    ("aggressive", "aggressive 95%", "tab:red", "-"),
    ("aggressive-99", "aggressive 99% (vLLM-like)", "tab:orange", "-"),
    ("conservative", "conservative (max_tokens)", "tab:green", "-"),
]


def plot_paper_grid(results, path: Path, rules: str = "paper") -> List[Path]:
    """The paper's layout (its Figure 7): one panel per workload (columns) and model (rows),
    goodput against clients, one line per policy. ``results`` maps ``"workload/model"`` to
    ``{clients: {policy: {"goodput_tps": ...}}}`` (what examples/paper_study.py writes)."""
    plt = _pyplot()
    workloads = list(dict.fromkeys(k.split("/")[0] for k in results))
    models = list(dict.fromkeys(k.split("/")[1] for k in results))
    fig, axes = plt.subplots(len(models), len(workloads), figsize=(3.4 * len(workloads), 2.8 * len(models)),
                             squeeze=False)
    for i, m in enumerate(models):
        for j, w in enumerate(workloads):
            ax = axes[i][j]
            panel = results.get(f"{w}/{m}")
            if not panel:
                ax.set_visible(False)
                continue
            clients = sorted(panel, key=float)
            for key, label, color, style in PAPER_POLICIES:
                ys = [panel[c][key]["goodput_tps"] for c in clients if key in panel[c]]
                if len(ys) == len(clients):
                    ax.plot([float(c) for c in clients], ys, style, color=color, marker="o", markersize=3, label=label)
            ax.set_title(f"{w}, Llama-2-{m.upper()}", fontsize=9)
            ax.grid(alpha=0.3)
            if i == len(models) - 1:
                ax.set_xlabel("clients")
            if j == 0:
                ax.set_ylabel("goodput (tok/s)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)
    fig.suptitle(f"Goodput against clients, {rules} rules", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [Path(path)]


SLO_QUEUES = [("fcfs", "FCFS", "tab:gray", "--"), ("fcfs+deadline", "FCFS + 8 s deadline", "tab:blue", "-."),
              ("slo", "SLO queue", "tab:red", "-")]


def plot_slo_study(results, path: Path, classes: bool = True) -> List[Path]:
    """examples/slo_study.py's figure: per workload (columns), goodput against load (top row) and,
    with SLO classes, each class's attainment (bottom row: interactive solid, batch dotted), one
    line per queue. ``results`` maps a workload to ``(knee, {load: {queue: point}})``."""
    plt = _pyplot()
    rows = 2 if classes else 1
    fig, axes = plt.subplots(rows, len(results), figsize=(3.6 * len(results), 2.9 * rows), squeeze=False)
    for j, (w, (knee, panel)) in enumerate(results.items()):
        loads = sorted(panel)
        for key, label, color, style in SLO_QUEUES:
            xs = [x for x in loads if key in panel[x]]
            axes[0][j].plot(xs, [panel[x][key]["goodput_tps"] for x in xs], style, color=color, marker="o",
                            markersize=3, label=label)
            if classes:
                for k, cls_style in enumerate(("-", ":")):
                    axes[1][j].plot(xs, [panel[x][key]["per_class"][k] for x in xs], cls_style, color=color,
                                    marker="o", markersize=3)
        for i in range(rows):
            axes[i][j].axvline(knee, color="black", alpha=0.3, linewidth=0.8)
            axes[i][j].grid(alpha=0.3)
            axes[i][j].set_xlabel("load (x the trace's rate)")
        axes[0][j].set_title(f"{w} (knee {knee}x)", fontsize=9)
        axes[0][j].set_ylabel("goodput (tok/s)")
        if classes:
            axes[1][j].set_ylabel("attainment (solid: interactive, dotted: batch)", fontsize=7)
            axes[1][j].set_ylim(0, 1.02)
    return _finish_grid(plt, fig, axes, path, ncol=3)


CLUSTER_ROUTERS = (("round-robin", "tab:gray", ":"), ("power-of-two", "tab:blue", "--"), ("prefix", "tab:orange", "-."),
                   ("forecast", "tab:green", "-"))


def plot_cluster_study(panels, path: Path) -> List[Path]:
    """examples/cluster_study.py's figure: per panel (columns: a workload and replica count),
    goodput against load (top row) and the cluster's prefix hit rate (bottom row), one line per
    router. ``panels`` maps a title to ``{load: {router: point}}``."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, len(panels), figsize=(3.6 * len(panels), 5.6), squeeze=False)
    for j, (title, panel) in enumerate(panels.items()):
        loads = sorted(panel, key=float)
        for router, color, style in CLUSTER_ROUTERS:
            xs = [float(x) for x in loads]
            axes[0][j].plot(xs, [panel[x][router]["goodput_tps"] for x in loads], style, color=color, marker="o",
                            markersize=3, label=router)
            axes[1][j].plot(xs, [panel[x][router]["prefix_hit_rate"] for x in loads], style, color=color, marker="o",
                            markersize=3)
        axes[0][j].set_title(title, fontsize=9)
        axes[0][j].set_ylabel("goodput (tok/s)")
        axes[1][j].set_ylabel("prefix hit rate")
        axes[1][j].set_ylim(0, 1)
        for i in range(2):
            axes[i][j].grid(alpha=0.3)
            axes[i][j].set_xlabel("load (x the trace's rate)")
    return _finish_grid(plt, fig, axes, path, ncol=4)
