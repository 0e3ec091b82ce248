"""Pareto front of predicted loss vs weight bytes as a PNG, with predicted latency where there is a latency budget
(matplotlib is an optional extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def pareto_png(front: list[dict[str, Any]], chosen: dict[str, Any] | None, title: str,
               unconstrained: list[dict[str, Any]] | None = None) -> bytes | None:
    """PNG bytes of the front (and the chosen point), or None when matplotlib is not installed. With a latency
    budget, ``unconstrained`` is the front without it, and each point is labelled with its predicted ms."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    import io
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    xs = [p["avg_bits"] for p in front]
    ys = [max(p["predicted_loss"], 1e-12) for p in front]
    ax.plot(xs, ys, "o-", label="predicted (exact solver)" if unconstrained is None else "within the latency budget")
    if unconstrained:
        ax.plot([p["avg_bits"] for p in unconstrained], [max(p["predicted_loss"], 1e-12) for p in unconstrained],
                ".--", alpha=0.7, label="without the latency budget")
    for p in (*front, *(unconstrained or ())):
        if "predicted_latency_ms" in p:
            ax.annotate(f"{p['predicted_latency_ms']:.3g} ms", (p["avg_bits"], max(p["predicted_loss"], 1e-12)),
                        fontsize=6, alpha=0.8, textcoords="offset points", xytext=(2, 3))
    if chosen is not None:
        if chosen.get("predicted_loss") is not None:
            ax.plot([chosen["avg_bits"]], [max(chosen["predicted_loss"], 1e-12)], "s", ms=9, label="chosen, predicted")
        ax.plot([chosen["avg_bits"]], [max(chosen["measured_loss"], 1e-12)], "*", ms=12, label="chosen, measured")
    ax.set_yscale("log")
    ax.set_xlabel("average stored bits per weight (scales included)")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def pareto_path(out: str | Path) -> Path:
    """``model.onnx`` → ``model.pareto.png`` beside it."""
    out = Path(out)
    stem = out.name[:-5] if out.name.endswith(".onnx") else out.name
    return out.with_name(stem + ".pareto.png")
