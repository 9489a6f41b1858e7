"""Draw the streaming sampler's noise levels along the horizon (docs/figures/streaming_ladder.png).

Run: .venv/bin/python docs/figures/make_streaming_ladder.py
The levels come from the sampler itself (runtime.samplers.StreamingSampler), not redrawn by hand.
"""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from dpstack.core.ladder import ladder_levels, rungs_for_action_steps  # noqa: E402
from dpstack.runtime.samplers import ChunkGeometry, StreamingSampler  # noqa: E402
from dpstack.core.schedule import NoiseSchedule  # noqa: E402


def main() -> None:
    schedule = NoiseSchedule()
    tp, to = 16, 2
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    s = StreamingSampler(lambda x, t, c: np.zeros_like(x), schedule, ChunkGeometry(tp, to, 1), n_rungs=15, evals_per_step=3)
    pos = np.arange(tp)
    ax = axes[0]
    for e, lv in enumerate(s.eval_levels):
        label = f"evaluation {e + 1} input" if e < len(s.eval_levels) - 1 else "after the step (-1 = clean)"
        ax.step(pos, lv, where="mid", marker="o", ms=3, label=label, alpha=0.9)
    ax.axvspan(-0.5, to - 1.5, color="0.85", label="history (executed, re-noised)")
    ax.axvline(to - 1, color="k", ls=":", lw=1)
    ax.annotate("executed now", (to - 1, -1), xytext=(to + 1, 10), arrowprops={"arrowstyle": "->"})
    ax.set(title="Tp=16, To=2, Ta=1: 15 rungs, 3 evaluations per control step", xlabel="horizon position",
           ylabel="diffusion level (0..99, -1 clean)", ylim=(-5, 102))
    ax.legend(fontsize=8, loc="upper left")
    ax = axes[1]
    for tp2, to2, ta in ((16, 2, 1), (16, 2, 4), (20, 2, 8)):
        h = rungs_for_action_steps(tp2, to2, ta)
        lv = ladder_levels(tp2, to2, h, 100, 0, ta if ta > 1 else None)
        ax.step(np.arange(tp2), lv, where="mid", marker="o", ms=3,
                label=f"Tp={tp2}, Ta={ta}: {h} rungs, {100 // h} evals/step at most")
    ax.set(title="The ladder between calls (shift 0) for several chunk sizes", xlabel="horizon position",
           ylabel="diffusion level", ylim=(-5, 102))
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    out = Path(__file__).with_name("streaming_ladder.png")
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
