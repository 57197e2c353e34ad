"""Render the TensorBoard scalars of a run headless, for docs: the event files under
``<out>/tensorboard/`` are read with TensorBoard's own ``EventAccumulator`` and plotted with
matplotlib (this is not a screenshot of the TensorBoard UI, which needs a browser).

    python scripts/tensorboard_demo.py runs/demo docs/results/tensorboard-demo.png

One panel per scalar in ``TAGS`` (those a run has), one line per run directory.
"""

from __future__ import annotations

import sys
from pathlib import Path

TAGS = ("accuracy/shared/mean", "accuracy/shared_head/mean", "accuracy/personal/mean",
        "loss/train/mean", "bytes/up", "seconds/round")  # fmt: skip


def read(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def main(out_dir: str, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {d.name: read(d) for d in sorted((Path(out_dir) / "tensorboard").iterdir())}
    tags = [t for t in TAGS if any(t in s for s in runs.values())]
    fig, axes = plt.subplots(2, (len(tags) + 1) // 2, figsize=(4.2 * ((len(tags) + 1) // 2), 6.4),
                             squeeze=False)  # fmt: skip
    for ax, tag in zip(axes.flat, tags):
        for name, scalars in runs.items():
            if tag in scalars:
                steps, values = zip(*scalars[tag])
                ax.plot(steps, values, marker="o", label=name)
        ax.set_title(tag, fontsize=10)
        ax.set_xlabel("round (step)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tags) :]:
        ax.axis("off")
    handles = {}
    for ax in axes.flat:  # one legend entry per run, whichever panels it appears in
        for line in ax.get_lines():
            handles.setdefault(line.get_label(), line)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=len(handles),
               fontsize=8)  # fmt: skip
    fig.suptitle(f"{out_dir}/tensorboard: scalars read with EventAccumulator (matplotlib "
                 "rendering, not the TensorBoard UI)", fontsize=9)  # fmt: skip
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    print(f"{png}: {len(tags)} scalars of {len(runs)} runs: {', '.join(runs)}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
