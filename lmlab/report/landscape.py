"""The loss around the trained weights: along filter-normalised random directions (Li et al., 2018), as a 1-D curve
or a 2-D contour, and the training trajectory (weight snapshots) projected on its two principal directions; measured
here, drawn in the chart style of every lmlab chart."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load

from .. import rundir
from ..common import LmlabError, atomic_write_bytes, atomic_write_json
from ..evaluate import stream_losses
from ..model import unique_parameters
from ..run import Run
from ..rundir import LANDSCAPE
from .chart import color, figure, finish, plain_text, png_bytes


def fixed_tokens(tokens: np.ndarray, block_size: int, batch: int) -> np.ndarray:
    """The start of a token stream that holds its first `batch` whole windows: the same batch every time."""
    n = min(batch, (len(tokens) - 1) // block_size)
    if n < 1:
        raise LmlabError(f"the validation text is shorter than one block of {block_size} tokens")
    return np.asarray(tokens[: n * block_size + 1])


def filter_normalized_direction(params: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A random direction scaled so that each filter (row of a weight matrix) has the norm of the same filter of
    the weights; vectors (norm gains, biases) get no component, as in Li et al."""
    direction = {}
    for name, p in params.items():
        if p.dim() < 2:
            direction[name] = torch.zeros_like(p)
            continue
        d = torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device)
        rows_d = d.reshape(d.size(0), -1)
        rows_p = p.detach().reshape(p.size(0), -1)
        scale = rows_p.norm(dim=1, keepdim=True) / (rows_d.norm(dim=1, keepdim=True) + 1e-10)
        direction[name] = (rows_d * scale).reshape(p.shape)
    return direction


@torch.no_grad()
def loss_at(model, params, base, directions, coefs, tokens: np.ndarray) -> float:
    """Mean loss over `tokens` (fixed_tokens) with weights base + sum_i coefs[i] * directions[i]."""
    for name, p in params.items():
        w = base[name].clone()
        for c, d in zip(coefs, directions):
            if c:
                w.add_(d[name], alpha=float(c))
        p.copy_(w)
    windows = len(tokens) // model.cfg.block_size
    return float(stream_losses(model, tokens, model.cfg.block_size, batch_size=windows).nats.double().mean())


@dataclass
class Landscape:
    coords: list[float]
    losses: list  # 1-D: list of floats; 2-D: rows (beta) of columns (alpha)
    center_loss: float


@torch.no_grad()
def scan(model, tokens: np.ndarray, directions, points: int, span: float) -> Landscape:
    """Evaluate the loss on a grid of `points` values in [-span, span] per direction (1 or 2 directions)."""
    params = dict(unique_parameters(model))
    base = {k: v.detach().clone() for k, v in params.items()}
    coords = np.linspace(-span, span, points).tolist()
    model.eval()
    try:
        center = loss_at(model, params, base, directions, [0.0] * len(directions), tokens)
        if len(directions) == 1:
            losses = [loss_at(model, params, base, directions, [a], tokens) for a in coords]
        else:
            losses = [[loss_at(model, params, base, directions, [a, b], tokens) for a in coords] for b in coords]
    finally:
        for k, p in params.items():
            p.copy_(base[k])
    return Landscape(coords, losses, center)


@torch.no_grad()
def readable_snapshots(run_dir: Path, model) -> list[tuple[Path, dict[str, torch.Tensor]]]:
    """The run's weight snapshots that hold every parameter of `model` in its shape; others are reported and
    skipped (a snapshot is a file of the run: it may be damaged, or not what its name says)."""
    params = dict(unique_parameters(model))
    good = []
    for snapshot in Run(run_dir).snapshots():
        path = snapshot.path
        try:
            tensors = load(snapshot.read())
        except (LmlabError, SafetensorError, OSError, ValueError) as e:
            print(f"warning: skipping weight snapshot {path}: {str(e).splitlines()[0] if str(e) else e}",
                  file=sys.stderr)
            continue
        if all(n in tensors and tensors[n].shape == p.shape for n, p in params.items()):
            good.append((path, tensors))
        else:
            print(f"warning: skipping weight snapshot {path}: it does not fit this model", file=sys.stderr)
    return good


def trajectory_plane(model, snapshots: list[dict[str, torch.Tensor]]) -> tuple[list[dict[str, torch.Tensor]], np.ndarray, np.ndarray]:
    """Principal directions of the snapshots' offsets from the final weights, and each snapshot's coordinates.

    Returns (two directions as parameter dicts, coordinates (n, 2), explained variance ratios (2,)).
    """
    params = dict(unique_parameters(model))
    names = list(params)
    final = torch.cat([params[n].detach().flatten().double().cpu() for n in names])
    rows = []
    for tensors in snapshots:
        rows.append(torch.cat([tensors[n].flatten().double() for n in names]) - final)
    offsets = torch.stack(rows)  # (n, P)
    # principal directions via the SVD of the offsets (no centring: the plane passes through the final weights)
    _, s, vh = torch.linalg.svd(offsets, full_matrices=False)
    k = min(2, vh.size(0))
    basis = vh[:k]
    if k < 2:  # a single snapshot: complete the plane with a random orthogonal direction
        extra = torch.randn(final.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        extra -= (extra @ basis[0]) * basis[0]
        basis = torch.stack([basis[0], extra / extra.norm()])
        s = torch.cat([s[:1], torch.zeros(1, dtype=s.dtype)])
    coords = (offsets @ basis.T).numpy()
    ratio = (s[:2] ** 2 / (s ** 2).sum().clamp_min(1e-30)).numpy()
    directions = []
    for b in basis:
        d, offset = {}, 0
        for n in names:
            numel = params[n].numel()
            d[n] = b[offset:offset + numel].view_as(params[n]).to(params[n].dtype).to(params[n].device)
            offset += numel
        directions.append(d)
    return directions, coords, ratio


@plain_text  # the run's folder name is in the title: "$" in it is not math
def plot_1d(land: Landscape, path: Path, title: str) -> None:
    fig, ax = figure(title, "step along a filter-normalised random direction", "loss (nats/token)")
    ax.plot(land.coords, land.losses, color=color(0))
    ax.axvline(0.0, color="gray", lw=0.8, ls="--")
    atomic_write_bytes(path, png_bytes(finish(fig)))  # replaced whole: a link at `path` is never written through


@plain_text
def plot_2d(land: Landscape, path: Path, title: str, xlabel: str, ylabel: str,
            points: np.ndarray | None = None, labels: list[str] | None = None) -> None:
    grid = np.array(land.losses)
    fig, ax = figure(title, xlabel, ylabel, size=(6.4, 5.2))
    levels = np.linspace(grid.min(), min(grid.max(), grid.min() + 3 * (np.median(grid) - grid.min() + 1e-6)), 25)
    cs = ax.contour(land.coords, land.coords, grid, levels=levels, cmap="viridis")
    ax.clabel(cs, inline=True, fontsize=7, fmt="%.2f")
    if points is not None:
        ax.plot(points[:, 0], points[:, 1], "o-", color=color(1), ms=4, lw=1.2, label="training trajectory")
        for (px, py), label in zip(points, labels or []):
            ax.annotate(label, (px, py), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.plot([0], [0], "*", color="black", ms=10)
    atomic_write_bytes(path, png_bytes(finish(fig, legend="upper right")))


def landscape(run_dir: Path, model, val_tokens: np.ndarray, two_d: bool, points: int, span: float, batch: int,
              seed: int, out_dir: Path) -> dict:
    """Compute and plot the landscape of a loaded run; write landscape.json and PNGs to out_dir."""
    if Path(out_dir).absolute() == (Path(run_dir) / LANDSCAPE).absolute():
        out_dir = rundir.make_dir(run_dir, LANDSCAPE)  # inside the run: never through a link
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
    tokens = fixed_tokens(val_tokens, model.cfg.block_size, batch)
    gen = torch.Generator().manual_seed(seed)
    params = dict(unique_parameters(model))
    result: dict = {"batch_windows": len(tokens) // model.cfg.block_size, "block_size": model.cfg.block_size,
                    "span": span, "points": points, "seed": seed}
    d1 = filter_normalized_direction(params, gen)
    line = scan(model, tokens, [d1], points, span)
    result["one_d"] = {"coords": line.coords, "losses": line.losses, "center_loss": line.center_loss}
    plot_1d(line, out_dir / "landscape_1d.png", f"loss around the trained weights ({run_dir.name})")
    if two_d:
        d2 = filter_normalized_direction(params, gen)
        grid = scan(model, tokens, [d1, d2], points, span)
        result["two_d"] = {"coords": grid.coords, "losses": grid.losses, "center_loss": grid.center_loss}
        plot_2d(grid, out_dir / "landscape_2d.png", f"loss surface, random directions ({run_dir.name})",
                "direction 1 (filter-normalised)", "direction 2 (filter-normalised)")
        snaps = readable_snapshots(run_dir, model)
        if snaps:
            dirs, coords, ratio = trajectory_plane(model, [tensors for _, tensors in snaps])
            reach = float(np.abs(coords).max()) * 1.25 + 1e-8
            plane = scan(model, tokens, dirs, points, reach)
            labels = [f"{int(p.stem.split('_')[1])}" for p, _ in snaps]
            result["trajectory"] = {"steps": [int(s) for s in labels], "coords": coords.tolist(),
                                    "explained_variance": ratio.tolist(), "grid_coords": plane.coords,
                                    "grid_losses": plane.losses}
            plot_2d(plane, out_dir / "trajectory.png", f"training trajectory ({run_dir.name}; step labels)",
                    f"PC1 ({ratio[0]:.0%} of the path's variance)", f"PC2 ({ratio[1]:.0%})", coords, labels)
    atomic_write_json(out_dir / "landscape.json", result)
    return result
