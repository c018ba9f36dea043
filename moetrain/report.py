"""``moetrain report RUN_DIR...``: one PNG dashboard of runs' ``metrics.jsonl``, and an HTML page beside it.

The dashboard has seven panels (:data:`PANELS`): the loss parts with validation points, the learning rate,
throughput and MFU, the gradient norm, MaxVio per MoE layer over steps (heatmap), the spread of each layer's expert
selection bias, and the tokens per expert of each MoE layer over the last steps (heatmap). Line panels overlay every
run (one colour each); heatmaps and the per-layer bias bands show the first run. A key a run did not log leaves its
panel saying so. The HTML page embeds the PNG (base64) above a summary table, so it travels as one file.

matplotlib is imported by :func:`build_figure` only: ``moetrain train`` never pays for it.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PANELS = ("loss", "learning_rate", "throughput", "grad_norm", "maxvio", "expert_bias", "expert_load")

FIGSIZE_IN, DPI = (16, 10), 110  # 1760 x 1100 pixels
# Loss parts on the left axis: (metrics key, legend text); the balance loss, orders of magnitude smaller, on the right.
LOSS_PARTS = (("loss", "total (LM + λ·MTP + balance)"), ("lm_loss", "LM"), ("mtp_loss", "MTP (per depth, λ-free)"))
PART_STYLES = ("-", "--", ":")  # several runs: a line style per loss part, a colour per run


class ReportError(Exception):
    """A run directory that cannot be reported (names the file)."""


@dataclass
class Run:
    """One run directory's step records (ascending step) and its resolved config (empty if it has none)."""

    dir: Path
    records: list[dict]
    config: dict = field(default_factory=dict)
    label: str = ""

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of the records that hold a number under ``key``."""
        pairs = [(r["step"], v) for r in self.records if (v := _number(r.get(key))) is not None]
        return (np.array([p[0] for p in pairs], dtype=float), np.array([p[1] for p in pairs], dtype=float))

    def rows(self, key: str) -> tuple[np.ndarray, list]:
        """(steps, values) of the records that hold a non-empty list under ``key``."""
        hits = [(r["step"], r[key]) for r in self.records if isinstance(r.get(key), list) and r[key]]
        return np.array([h[0] for h in hits], dtype=float), [h[1] for h in hits]

    @property
    def last(self) -> dict:
        return self.records[-1]


def load_run(run_dir: str | Path) -> Run:
    """Read ``run_dir/metrics.jsonl`` (and ``config.yaml`` if there); a missing file or one without a single step
    record raises :class:`ReportError`. Unreadable lines (the torn last line of a killed run) are skipped."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ReportError(f"{path}: no such file (is {run_dir} the run.dir of a run with logging.jsonl=true?)")
    records = {}
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(r, dict) and isinstance(r.get("step"), int):
            records[r["step"]] = r  # a step logged twice (a resumed run): the later record
    if not records:
        raise ReportError(f"{path}: no step records (the file is empty or unreadable)")
    return Run(run_dir, [records[s] for s in sorted(records)], _read_config(run_dir / "config.yaml"),
               _labels([run_dir])[0])


def _read_config(path: Path) -> dict:
    if not path.is_file():
        return {}
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception:  # NOTE: the config only names the model in the title; a broken one must not stop the report
        return {}


def _number(v) -> float | None:
    """A float for numbers and the strings metrics.jsonl writes for non-finite values ("nan", "inf")."""
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return None
    return None


def _human(n: float) -> str:
    """82k, 1.2M, 14.8T."""
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.3g}"


def model_name(config: dict) -> str:
    """The conf/model preset the run's model config matches (``model=tiny``), else its shape in words."""
    model = config.get("model")
    if not isinstance(model, dict):
        return ""
    preset = _matching_preset(model)
    moe, attn = model.get("moe", {}), model.get("attn", {})
    shape = (f"{model.get('n_layers')} layers + {model.get('n_mtp_layers', 0)} MTP, dim {model.get('dim')}, "
             f"{moe.get('n_routed_experts')} experts top-{moe.get('router', {}).get('topk')}, "
             f"{attn.get('n_heads')} heads")
    return f"model={preset} ({shape})" if preset else shape


def _matching_preset(model: dict) -> str | None:
    if not isinstance(model, dict) or not model:
        return None
    from omegaconf import OmegaConf

    from moetrain.model.presets import preset_names
    from moetrain.resources import conf_dir

    def within(preset, saved) -> bool:  # every key the preset sets has its value in the saved config
        if isinstance(preset, dict):
            return isinstance(saved, dict) and all(within(v, saved.get(k)) for k, v in preset.items())
        return preset == saved

    for name in preset_names():
        path = conf_dir() / "model" / f"{name}.yaml"
        try:
            preset = OmegaConf.to_container(OmegaConf.load(path))
        except Exception:
            continue
        if isinstance(preset, dict) and "defaults" not in preset and within(preset, model):
            return name
    return None


def _labels(dirs: list[Path]) -> list[str]:
    """Each run's directory name, or its whole path where two runs share a name."""
    names = [d.resolve().name or str(d) for d in dirs]
    return [str(d) if names.count(n) > 1 else n for d, n in zip(dirs, names)]


# ------------------------------------------------------------------------------------------------------------ figure
def build_figure(runs: list[Run], last: int | None = None):
    """The dashboard figure (Agg canvas) and its axes by panel name (:data:`PANELS`).

    last: the steps the tokens-per-expert heatmap averages over (default: 10% of the steps, at least 10).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE_IN, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    # NOTE: a subfigure per row, so that one panel's legend or colorbar does not shift the columns of the others.
    top, middle, bottom = fig.subfigures(3, 1, hspace=0.02)
    axes = dict(zip(("loss", "learning_rate"), top.subplots(1, 2, width_ratios=[2, 1])))
    axes.update(zip(("throughput", "grad_norm", "expert_bias"), middle.subplots(1, 3)))
    axes.update(zip(("maxvio", "expert_load"), bottom.subplots(1, 2, width_ratios=[2, 1])))
    colors = [f"C{i % 10}" for i in range(len(runs))]
    _loss_panel(axes["loss"], runs, colors)
    _line_panel(axes["learning_rate"], runs, colors, "lr", "Learning rate", "learning rate")
    _throughput_panel(axes["throughput"], runs, colors)
    _line_panel(axes["grad_norm"], runs, colors, "grad_norm", "Gradient norm (before clipping)", "global L2 norm")
    _clip_line(axes["grad_norm"], runs[0])
    _maxvio_panel(fig, axes["maxvio"], runs)
    _bias_panel(fig, axes["expert_bias"], runs, colors)
    _load_panel(fig, axes["expert_load"], runs[0], last, len(runs))
    for name in ("loss", "learning_rate", "throughput", "grad_norm", "maxvio", "expert_bias"):
        _tokens_axis(axes[name], runs[0], several=len(runs) > 1)
    _titles(fig, runs, colors)
    return fig, axes


def _titles(fig, runs: list[Run], colors: list[str]) -> None:
    """Suptitle: run dir, model, steps and tokens; several runs: a legend of their colours under it."""
    def facts(run: Run, full_model: bool) -> list[str]:
        tokens = _number(run.last.get("tokens_seen"))
        preset = model_name(run.config) if full_model else _matching_preset(run.config.get("model") or {})
        model = [preset if full_model else f"model={preset}"] if preset else []
        return model + [f"{run.last['step']} steps"] + ([f"{_human(tokens)} tokens"] if tokens else [])

    if len(runs) == 1:
        fig.suptitle(f"moetrain report: {runs[0].dir}\n" + " · ".join(facts(runs[0], True)), fontsize=14)
        return
    fig.suptitle(f"moetrain report: {len(runs)} runs (heatmaps and bias bands: {runs[0].label})", fontsize=14)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, lw=3) for c in colors]
    texts = [f"{run.dir} ({', '.join(facts(run, False))})" for run in runs]
    top = fig.subfigs[0]
    top.legend(handles, texts, loc="outside upper center", ncols=min(len(runs), 3), fontsize=10, frameon=False)


def _style(ax, title: str, ylabel: str, xlabel: str = "step") -> None:
    ax.set_title(title, fontsize=12, fontweight="bold", loc="left")
    ax.set_xlabel(xlabel, fontsize=10)
    ax.set_ylabel(ylabel, fontsize=10)
    ax.tick_params(labelsize=9)
    ax.grid(alpha=0.3)


def _not_logged(ax, title: str, what: str) -> None:
    ax.set_title(title, fontsize=12, fontweight="bold", loc="left")
    ax.text(0.5, 0.5, f"{what}\nnot logged", ha="center", va="center", fontsize=13, color="0.35",
            transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _tokens_axis(ax, run: Run, several: bool) -> None:
    """A top axis in tokens seen (from the first run's tokens_seen), where the panel has a step axis."""
    steps, tokens = run.series("tokens_seen")
    if len(steps) < 2 or not ax.has_data() or np.any(np.diff(tokens) <= 0):
        return
    steps, tokens = np.r_[0.0, steps], np.r_[0.0, tokens]
    top = ax.secondary_xaxis("top", functions=(lambda s: _extrapolate(s, steps, tokens),
                                               lambda t: _extrapolate(t, tokens, steps)))
    from matplotlib.ticker import FuncFormatter

    top.xaxis.set_major_formatter(FuncFormatter(lambda t, _: _human(t)))
    top.set_xlabel("tokens seen" + (f" ({run.label})" if several else ""), fontsize=9)
    top.tick_params(labelsize=8)


def _extrapolate(x, xp: np.ndarray, fp: np.ndarray):
    """np.interp, continued linearly past both ends (the axes' margins reach beyond the logged steps)."""
    x = np.asarray(x, dtype=float)
    y = np.interp(x, xp, fp)
    lo, hi = (fp[1] - fp[0]) / (xp[1] - xp[0]), (fp[-1] - fp[-2]) / (xp[-1] - xp[-2])
    y = np.where(x < xp[0], fp[0] + (x - xp[0]) * lo, y)
    return np.where(x > xp[-1], fp[-1] + (x - xp[-1]) * hi, y)


def _loss_panel(ax, runs: list[Run], colors: list[str]) -> None:
    title = "Loss (nats/token)"
    parts = [(k, text) for k, text in LOSS_PARTS if any(len(r.series(k)[0]) for r in runs)]
    has_val = any(len(r.series("val_loss")[0]) for r in runs)
    has_bal = any(len(r.series("balance_loss")[0]) for r in runs)
    if not parts and not has_val:
        return _not_logged(ax, title, "loss")
    several = len(runs) > 1
    twin = ax.twinx() if has_bal else None
    for i, run in enumerate(runs):
        for j, (key, text) in enumerate(parts):
            steps, v = run.series(key)
            color, ls = (colors[i], PART_STYLES[j]) if several else (f"C{j}", "-")
            ax.plot(steps, v, color=color, ls=ls, lw=1.6, label=text, gid=f"{key}|{run.label}")
        if has_val:
            steps, v = run.series("val_loss")
            ax.plot(steps, v, "o", color=colors[i] if several else "black", ms=6, mec="white", zorder=5,
                    label="validation LM loss", gid=f"val_loss|{run.label}")
        if twin is not None:
            steps, v = run.series("balance_loss")
            twin.plot(steps, v, color=colors[i] if several else "C3", ls="-.", lw=1.0, alpha=0.7,
                      label="balance (right axis)", gid=f"balance_loss|{run.label}")
    _style(ax, title + (": line style = part, colour = run" if several else ""), "loss (nats/token)")
    handles, labels = ax.get_legend_handles_labels()
    if twin is not None:
        twin.set_ylabel("balance loss" + _scale_axis(twin, [run.series("balance_loss")[1] for run in runs]),
                        fontsize=10, color="0.3")
        twin.tick_params(labelsize=9, colors="0.3")
        h, lab = twin.get_legend_handles_labels()
        handles, labels = handles + h, labels + lab
    if several:  # one legend entry per part, drawn in black
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], color="black", ls=PART_STYLES[j]) for j in range(len(parts))]
        labels = [text for _, text in parts]
        if has_val:
            handles.append(Line2D([], [], color="black", marker="o", ls=""))
            labels.append("validation LM loss")
        if twin is not None:
            handles.append(Line2D([], [], color="black", ls="-.", alpha=0.7))
            labels.append("balance (right axis)")
    unique = dict(zip(labels, handles))
    # NOTE: beside the axes, where no curve runs under it.
    ax.legend(unique.values(), unique.keys(), fontsize=9, loc="upper left", bbox_to_anchor=(1.07, 1.0),
              frameon=False)


def _scale_axis(ax, values: list[np.ndarray]) -> str:
    """Show the y axis in units of a power of ten (no offset text colliding with a top axis); returns the label
    suffix naming the unit, e.g. " (×1e-4)"."""
    from matplotlib.ticker import FuncFormatter

    peak = max((float(np.nanmax(np.abs(v))) for v in values if len(v) and np.isfinite(v).any()), default=0.0)
    exponent = math.floor(math.log10(peak)) if peak > 0 else 0
    if -2 <= exponent <= 3:
        return ""
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y / 10 ** exponent:g}"))
    return f" (×1e{exponent})"


def _line_panel(ax, runs, colors, key: str, title: str, ylabel: str) -> bool:
    if not any(len(r.series(key)[0]) for r in runs):
        _not_logged(ax, title, key)
        return False
    for i, run in enumerate(runs):
        steps, v = run.series(key)
        ax.plot(steps, v, color=colors[i], lw=1.6, label=run.label, gid=f"{key}|{run.label}")
    _style(ax, title, ylabel + _scale_axis(ax, [r.series(key)[1] for r in runs]))
    return True


def _clip_line(ax, run: Run) -> None:
    clip = _number(run.config.get("optim", {}).get("grad_clip")) if isinstance(run.config.get("optim"), dict) else None
    if clip and ax.has_data():
        ax.axhline(clip, color="0.4", ls="--", lw=1)
        ax.text(0.99, clip, f"clip at {clip:g} (optim.grad_clip)", color="0.3", fontsize=8, ha="right", va="bottom",
                transform=ax.get_yaxis_transform(), bbox=dict(facecolor="white", edgecolor="none", alpha=0.8))


def _throughput_panel(ax, runs, colors) -> None:
    title = "Throughput and MFU"
    if not any(len(r.series("tokens_per_s")[0]) for r in runs):
        return _not_logged(ax, title, "tokens/s")
    for i, run in enumerate(runs):
        steps, v = run.series("tokens_per_s")
        ax.plot(steps, v / 1e3, color=colors[i], lw=1.6, label="tokens/s", gid=f"tokens_per_s|{run.label}")
    _style(ax, title, "thousand tokens/s (all devices)")
    if not any(len(r.series("mfu")[0]) for r in runs):
        ax.text(0.98, 0.96, "MFU not logged (set logging.peak_tflops)", fontsize=8, color="0.3", ha="right",
                va="top", transform=ax.transAxes, bbox=dict(facecolor="white", edgecolor="none", alpha=0.8))
        return
    twin = ax.twinx()
    for i, run in enumerate(runs):
        steps, v = run.series("mfu")
        twin.plot(steps, 100 * v, color=colors[i], ls="--", lw=1.2, alpha=0.8, label="MFU (right axis)",
                  gid=f"mfu|{run.label}")
    twin.set_ylabel("MFU (%)", fontsize=10)
    twin.tick_params(labelsize=9)
    from matplotlib.lines import Line2D

    ax.legend([Line2D([], [], color="black"), Line2D([], [], color="black", ls="--")], ["tokens/s", "MFU (right)"],
              fontsize=9, loc="best", framealpha=0.85)


def _layer_names(run: Run, n: int) -> list[str]:
    """Global ids of the MoE layers (MTP blocks as MTP1...), from the run's config; else 0..n-1."""
    model = run.config.get("model") if isinstance(run.config.get("model"), dict) else {}
    try:
        n_layers, first = int(model["n_layers"]), int(model["moe"]["first_k_dense_replace"])
        ids = [i for i in range(n_layers + int(model.get("n_mtp_layers", 0))) if i >= first]
    except (KeyError, TypeError, ValueError):
        ids = []
    if len(ids) != n:
        return [str(i) for i in range(n)]
    return [str(i) if i < n_layers else f"MTP{i - n_layers + 1}" for i in ids]


def _layer_ticks(ax, names: list[str]) -> None:
    stride = max(1, math.ceil(len(names) / 16))
    ticks = list(range(0, len(names), stride))
    ax.set_yticks(ticks, [names[t] for t in ticks])


def _matrix(rows: list) -> np.ndarray | None:
    """Rows of equal length as a 2-D float array (rows of another length, a changed layout, are dropped)."""
    width = max((len(r) for r in rows), key=[len(r) for r in rows].count, default=0)
    kept = [[_number(x) if _number(x) is not None else np.nan for x in r] for r in rows if len(r) == width]
    return np.array(kept, dtype=float) if kept and width else None


def _edges(steps: np.ndarray) -> np.ndarray:
    """Cell edges around each step: halfway between neighbours, half a gap past the ends."""
    if len(steps) == 1:
        return np.array([steps[0] - 0.5, steps[0] + 0.5])
    mid = (steps[1:] + steps[:-1]) / 2
    return np.r_[steps[0] - (mid[0] - steps[0]), mid, steps[-1] + (steps[-1] - mid[-1])]


def _first_run_note(n_runs: int, run: Run) -> str:
    return f" — {run.label}" if n_runs > 1 else ""


def _maxvio_panel(fig, ax, runs: list[Run]) -> None:
    run = runs[0]
    title = "MaxVio per MoE layer" + _first_run_note(len(runs), run)
    steps, rows = run.rows("max_violation_per_layer")
    keep = [i for i, r in enumerate(rows) if len(r) == len(rows[-1])] if rows else []
    m = _matrix([rows[i] for i in keep]) if keep else None
    if m is None:
        return _not_logged(ax, title, "max_violation_per_layer")
    steps = steps[keep]
    mesh = ax.pcolormesh(_edges(steps), np.arange(m.shape[1] + 1) - 0.5, m.T, cmap="viridis", vmin=0,
                         shading="flat")
    _style(ax, title + " (load balance at each logged step; 0 = balanced)", "MoE layer (global id)")
    _layer_ticks(ax, _layer_names(run, m.shape[1]))
    ax.grid(False)
    ax.figure.colorbar(mesh, ax=ax, pad=0.01, fraction=0.03).set_label("MaxVio = max load / mean load − 1", fontsize=9)


def _bias_panel(fig, ax, runs: list[Run], colors: list[str]) -> None:
    run = runs[0]
    title = "Expert selection bias per MoE layer" + _first_run_note(len(runs), run)
    steps, lo = run.rows("expert_bias_min_per_layer")
    _, hi = run.rows("expert_bias_max_per_layer")
    lo, hi = (_matrix(lo), _matrix(hi)) if len(lo) and len(lo) == len(hi) else (None, None)
    if lo is not None and hi is not None and lo.shape == hi.shape:
        from matplotlib import colormaps

        cmap = colormaps["viridis"]
        n = lo.shape[1]
        names = _layer_names(run, n)
        for layer in range(n):
            color = cmap(layer / max(n - 1, 1))
            ax.fill_between(steps, lo[:, layer], hi[:, layer], color=color, alpha=0.25, lw=0)
            ax.plot(steps, lo[:, layer], color=color, lw=0.8)
            ax.plot(steps, hi[:, layer], color=color, lw=0.8, label=f"layer {names[layer]}" if n <= 8 else None)
        _style(ax, title, "bias (router score units)")
        ax.text(0.01, 0.02, "band: min..max over experts", fontsize=8, color="0.3", transform=ax.transAxes)
        if n <= 8:
            ax.legend(fontsize=8, loc="upper left", ncols=2, framealpha=0.85)
        else:
            from matplotlib.cm import ScalarMappable
            from matplotlib.colors import Normalize

            ax.figure.colorbar(ScalarMappable(Normalize(0, n - 1), cmap), ax=ax, pad=0.01).set_label("MoE layer index")
        return
    if not any(len(r.series("expert_bias_abs_mean")[0]) for r in runs):
        return _not_logged(ax, title, "expert bias")
    if _line_panel(ax, runs, colors, "expert_bias_abs_mean", "Expert selection bias: mean |bias|",
                   "mean |bias| over layers and experts"):
        ax.text(0.01, 0.02, "per-layer min/max not logged", fontsize=8, color="0.3", transform=ax.transAxes)


def default_last(run: Run) -> int:
    """10% of the run's steps, at least 10."""
    return max(10, round(0.1 * run.last["step"]))


def expert_load_window(run: Run, last: int | None = None) -> tuple[np.ndarray | None, int, int]:
    """The tokens per expert of each MoE layer [L, E] summed over the records of the last ``last`` steps, and the
    (first, last) step the sum covers (each record counts the steps since the one before)."""
    steps, rows = run.rows("expert_load")
    if not len(rows):
        return None, 0, 0
    last = default_last(run) if last is None else last
    end = int(steps[-1])
    shape = np.shape(rows[-1])
    keep = [i for i, s in enumerate(steps) if s > end - last and np.shape(rows[i]) == shape]
    prev = [s for s in run.series("step")[0] if s < steps[keep[0]]]  # the record before the window's first
    start = int(prev[-1]) + 1 if prev else 1
    return np.sum([np.asarray(rows[i], dtype=float) for i in keep], axis=0), start, end


def _load_panel(fig, ax, run: Run, last: int | None, n_runs: int) -> None:
    title = "Tokens per expert" + _first_run_note(n_runs, run)
    load_LE, start, end = expert_load_window(run, last)
    if load_LE is None or load_LE.ndim != 2 or not load_LE.size:
        return _not_logged(ax, title, "expert_load")
    from matplotlib.colors import TwoSlopeNorm

    mean_L = load_LE.mean(axis=1, keepdims=True)
    rel_LE = load_LE / np.where(mean_L > 0, mean_L, 1)
    vmax = max(2.0, float(np.nanmax(rel_LE)))
    image = ax.imshow(rel_LE, aspect="auto", origin="lower", cmap="RdBu_r", norm=TwoSlopeNorm(1.0, 0.0, vmax),
                      interpolation="nearest")
    per_step = float(load_LE.mean()) / max(end - start + 1, 1)
    _style(ax, f"{title}, steps {start}–{end}", "MoE layer (global id)", xlabel="routed expert")
    _layer_ticks(ax, _layer_names(run, load_LE.shape[0]))
    ax.grid(False)
    if load_LE.shape[1] <= 32:
        ax.set_xticks(range(load_LE.shape[1]))
    bar = ax.figure.colorbar(image, ax=ax, pad=0.01, fraction=0.05)
    bar.set_label(f"load / layer mean ({_human(per_step)} tokens/expert/step)", fontsize=9)


# ------------------------------------------------------------------------------------------------------------ output
def render(run_dirs: list[str | Path], out: str | Path | None = None, last: int | None = None) -> dict:
    """Write the dashboard PNG (default ``<first run dir>/report.png``) and the HTML page beside it (same name,
    .html). Returns each panel's axes box in PNG pixels, ``{name: (left, top, right, bottom)}``."""
    runs = [load_run(d) for d in run_dirs]
    for run, label in zip(runs, _labels([r.dir for r in runs])):
        run.label = label
    out = Path(out) if out is not None else runs[0].dir / "report.png"
    if out.suffix.lower() != ".png":
        raise ReportError(f"--out {out}: the dashboard is a PNG; name it *.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = build_figure(runs, last)
    fig.savefig(out, dpi=DPI, facecolor="white")
    height = fig.bbox.height
    boxes = {}
    for name in PANELS:
        b = axes[name].get_window_extent()  # after savefig's draw: display pixels, origin bottom left
        boxes[name] = (int(b.x0), int(height - b.y1), int(math.ceil(b.x1)), int(math.ceil(height - b.y0)))
    out.with_suffix(".html").write_text(_html(runs, out))
    return boxes


def summary(run: Run) -> dict[str, str]:
    """The HTML table's row: run dir, model, steps, tokens, final loss, final val loss, mean tokens/s, MFU."""
    def final(key):
        _, v = run.series(key)
        return f"{v[-1]:.4f}" if len(v) else "not logged"

    tps, mfu = run.series("tokens_per_s")[1], run.series("mfu")[1]
    tokens = _number(run.last.get("tokens_seen"))
    return {"run dir": str(run.dir), "model": model_name(run.config) or "unknown (no config.yaml)",
            "steps": str(run.last["step"]), "tokens": _human(tokens) if tokens else "not logged",
            "final loss": final("loss"), "final val loss": final("val_loss"),
            "mean tokens/s": f"{tps.mean():,.0f}" if len(tps) else "not logged",
            "mean MFU": f"{100 * mfu.mean():.1f}%" if len(mfu) else "not logged"}


def _html(runs: list[Run], png: Path) -> str:
    rows = [summary(r) for r in runs]
    head = "".join(f"<th>{html.escape(k)}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row.values()) + "</tr>" for row in rows)
    data = base64.b64encode(png.read_bytes()).decode()
    title = html.escape("moetrain report: " + ", ".join(str(r.dir) for r in runs))
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;margin:1em}} table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #bbb;padding:4px 10px;text-align:right}} td:first-child{{text-align:left}}
img{{max-width:100%}}</style></head>
<body><h1>{title}</h1>
<table><tr>{head}</tr>{body}</table>
<img alt="moetrain dashboard" src="data:image/png;base64,{data}">
<p>Loss: nats per target token; MaxVio = max load / mean load &minus; 1 per MoE layer;
tokens per expert are summed over the steps named in the panel title. From each run's metrics.jsonl.</p>
</body></html>
"""


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="moetrain report", description=(
        "Render run directories' metrics.jsonl as one PNG dashboard and a self-contained HTML page beside it. "
        "Several runs: the line panels overlay them; the heatmaps show the first."))
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a run.dir of moetrain train")
    parser.add_argument("--out", help="the PNG to write (default: <first RUN_DIR>/report.png); the HTML goes beside")
    parser.add_argument("--last", type=int, help="steps the tokens-per-expert heatmap averages over "
                                                 "(default: 10%% of the steps, at least 10)")
    args = parser.parse_args(argv)
    if args.last is not None and args.last < 1:
        parser.error("--last must be >= 1")
    try:
        render(args.run_dirs, args.out, args.last)
    except ReportError as e:
        print(f"moetrain report: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(args.run_dirs[0]) / "report.png"
    print(f"report: {out} and {out.with_suffix('.html')}")
    return 0
