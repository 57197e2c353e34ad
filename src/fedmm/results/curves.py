"""``curves.png``: accuracy per round, one line per (run, view), one panel per benchmark (matplotlib)."""

from __future__ import annotations

import io
from pathlib import Path

from fedmm.files import atomic_write
from fedmm.results.views import dataset_name, label, view_curve


def write_curves(out_dir: str | Path, data: dict) -> None:
    """Accuracy per round, one line per (method, view); one panel per benchmark, titled with
    its data set (``results.dataset_name``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benches = sorted({r["benchmark"] for r in data["runs"]})
    if not benches:
        return
    fig, axes = plt.subplots(1, len(benches), figsize=(6 * len(benches), 4), squeeze=False)
    styles = {"shared": "-", "shared+head": "-.", "personal": "--", "client": ":"}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, bench in zip(axes[0], benches):
        runs = [r for r in data["runs"] if r["benchmark"] == bench]
        for i, r in enumerate(runs):
            for view in r["views"]:
                xs = [h["round"] for h in r["history"]]
                ys = [float("nan") if y is None else 100 * y for y in view_curve(r, view)]
                ax.plot(xs, ys, linestyle=styles.get(view, (0, (3, 1, 1, 1))), marker="o",
                        color=colors[i % len(colors)],
                        label=f"{label(r)} s{r['seed']} ({view})")  # fmt: skip
        ax.set_title(dataset_name(runs[0]))  # the data set, never the format ("jsonl")
        ax.set_xlabel("round")
        ax.set_ylabel("mean client accuracy (%)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    atomic_write(Path(out_dir) / "curves.png", png.getvalue())
