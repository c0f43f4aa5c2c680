"""Pictures of synthetic sets and training curves (matplotlib Figure + Agg rendering: no display needed).

- ``save_grid``: class-major image grid, one class per row, nearest-neighbour upscaling, exact pixel size.
- ``show_artifact``: the grid (+ a 2.5-sigma clipped variant) and, for low-rank sets, the dimension mappers
  (form A: U, V and the rank-1 components; form B: each mapper column as an image, and the mean) and the basis
  vectors / codes (form A: r x r cores; form B: code vectors), as in the paper's Fig. 4/5.
- ``plot_curves``: matching loss (with moving average), lr and validation accuracy vs iteration from a
  JSONL log.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
# Figure objects without pyplot: PNGs render through Agg and no display or global backend switch is involved
# (calling matplotlib.use here would change the backend of a user's notebook).
from matplotlib.figure import Figure

from mttlss.io_utils import atomic_write_bytes

PAD = 2  # pixels between grid cells (and around the border)
PAD_VALUE = 1.0  # white


def _prepare(img: torch.Tensor, clip_sigma: float | None) -> torch.Tensor:
    """[C, H, W] pixel space -> [C, H, W] in [0, 1]."""
    img = img.detach().float().cpu()
    if clip_sigma is None:
        return img.clamp(0, 1)
    # MTT's viewing trick: clip outliers at mean +- k std, then stretch that range to [0, 1].
    m, s = img.mean(), img.std()
    lo, hi = m - clip_sigma * s, m + clip_sigma * s
    img = img.clamp(lo, hi)
    lo, hi = img.min(), img.max()
    return (img - lo) / (hi - lo) if hi > lo else torch.full_like(img, 0.5)


def grid_array(images_pixels: torch.Tensor, hard_labels: torch.Tensor, num_classes: int, *, max_per_class: int = 10,
               upscale: int = 4, clip_sigma: float | None = None) -> np.ndarray:
    """[rows*h, cols*w, C] float array in [0, 1]: class c in row c, its first images left to right."""
    if images_pixels.dim() != 4 or images_pixels.shape[1] not in (1, 3):
        raise ValueError(f"images must be [n, 1 or 3, H, W] pixel space, got {tuple(images_pixels.shape)}")
    n, c, h, w = images_pixels.shape
    hard = torch.as_tensor(hard_labels).long().cpu()
    if hard.numel() != n:
        raise ValueError(f"{hard.numel()} labels for {n} images")
    rows = [torch.nonzero(hard == k).flatten()[:max_per_class] for k in range(num_classes)]
    cols = max(1, max(len(r) for r in rows))
    ch, cw = h * upscale, w * upscale
    canvas = torch.full((c, PAD + num_classes * (ch + PAD), PAD + cols * (cw + PAD)), PAD_VALUE)
    for k, idx in enumerate(rows):
        for j, i in enumerate(idx.tolist()):
            cell = _prepare(images_pixels[i], clip_sigma)
            cell = cell.repeat_interleave(upscale, 1).repeat_interleave(upscale, 2)  # nearest neighbour
            y, x = PAD + k * (ch + PAD), PAD + j * (cw + PAD)
            canvas[:, y:y + ch, x:x + cw] = cell
    return canvas.permute(1, 2, 0).numpy()


def _save_png(path, arr: np.ndarray) -> Path:
    u8 = (np.clip(arr, 0, 1) * 255.0).round().astype(np.uint8)
    img = Image.fromarray(u8[:, :, 0] if u8.shape[2] == 1 else u8)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def save_grid(images_pixels: torch.Tensor, hard_labels: torch.Tensor, class_names, path, *, max_per_class: int = 10,
              upscale: int = 4, clip_sigma: float | None = None) -> Path:
    """Write a class-major PNG grid of pixel-space images [n, C, H, W] (row k = class_names[k]).

    Size: width = PAD + cols * (W * upscale + PAD), height = PAD + classes * (H * upscale + PAD), PAD = 2,
    cols = the largest number of images shown for a class (<= max_per_class). Without ``clip_sigma`` images
    are clamped to [0, 1]; with it each image is clipped at mean +- clip_sigma * std and stretched to [0, 1].
    """
    arr = grid_array(images_pixels, hard_labels, len(class_names), max_per_class=max_per_class, upscale=upscale,
                     clip_sigma=clip_sigma)
    return _save_png(path, arr)


def _save_figure(fig: Figure, path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return atomic_write_bytes(path, buf.getvalue())


def _imshow(ax, mat: np.ndarray, *, symmetric: bool = True) -> None:
    if mat.ndim == 3:  # [H, W, 3] colour, rescale to [0, 1] for display
        lo, hi = mat.min(), mat.max()
        ax.imshow((mat - lo) / (hi - lo) if hi > lo else np.zeros_like(mat), interpolation="nearest")
    else:
        v = float(np.abs(mat).max()) or 1.0
        ax.imshow(mat, cmap="coolwarm" if symmetric else "gray", vmin=-v if symmetric else None,
                  vmax=v if symmetric else None, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def _sibling(out_path: Path, suffix: str) -> Path:
    return out_path.with_name(out_path.stem + suffix)


def _plot_mappers(syn, path: Path, *, max_subspaces: int = 4, max_rank: int = 8) -> Path:
    """Rows: the first subspaces; columns: U [H, r], V [W, r], then the rank-1 images u_j v_j^T, j < r."""
    u = syn.mappers_U.detach().float().cpu()  # [K, Cm, H, r]
    v = syn.mappers_V.detach().float().cpu()  # [K, Cm, W, r]
    k_show = min(max_subspaces, u.shape[0])
    r_show = min(max_rank, u.shape[-1])
    fig = Figure(figsize=(1.3 * (2 + r_show), 1.3 * k_show + 0.6), layout="constrained")  # room for the title
    axes = fig.subplots(k_show, 2 + r_show, squeeze=False)
    for k in range(k_show):
        # Channel 0 for the U/V matrices (Cm = 1 when mappers are shared across channels).
        _imshow(axes[k, 0], u[k, 0].numpy())
        _imshow(axes[k, 1], v[k, 0].numpy())
        axes[k, 0].set_ylabel(f"subspace {k}", fontsize=7)
        for j in range(r_show):
            comp = torch.einsum("ch,cw->hwc", u[k, :, :, j], v[k, :, :, j])  # [H, W, Cm], rank-1 component
            _imshow(axes[k, 2 + j], comp.numpy() if comp.shape[2] == 3 else comp[:, :, 0].numpy())
            if k == 0:
                axes[0, 2 + j].set_title(f"r{j}", fontsize=7)
    axes[0, 0].set_title("U", fontsize=7)
    axes[0, 1].set_title("V", fontsize=7)
    fig.suptitle("dimension mappers (U, V) and rank-1 components", fontsize=8)
    return _save_figure(fig, path)


def _code_classes(syn) -> torch.Tensor:
    n = syn.codes.shape[0]
    hard = syn.labels_hard().cpu()
    if hard.numel() == n:
        return hard
    # Codes not one per image: derive the class from the code's subspace (subspaces are class-major).
    return (syn.subspace_of.cpu() * syn.num_classes) // syn.mappers_U.shape[0]


def _plot_codes(syn, path: Path, class_names, *, per_class: int = 3, max_classes: int = 10) -> Path:
    """Rows: classes; columns: the r x r cores (channel 0) of the first few codes of each class."""
    codes = syn.codes.detach().float().cpu()  # [n, C, r, r] (full) or [n, C, r] (diagonal)
    if codes.dim() == 3:
        codes = torch.diag_embed(codes)
    classes = _code_classes(syn)
    k_show = min(max_classes, syn.num_classes)
    fig = Figure(figsize=(1.2 * per_class + 0.8, 1.2 * k_show + 0.4))
    axes = fig.subplots(k_show, per_class, squeeze=False)
    for k in range(k_show):
        idx = torch.nonzero(classes == k).flatten()[:per_class].tolist()
        for j in range(per_class):
            ax = axes[k, j]
            if j < len(idx):
                _imshow(ax, codes[idx[j], 0].numpy())
            else:
                ax.axis("off")
        axes[k, 0].set_ylabel(str(class_names[k])[:12], fontsize=7)
    fig.suptitle("basis vectors / codes (r x r cores, channel 0)", fontsize=8)
    return _save_figure(fig, path)


def _plot_vector_mappers(syn, path: Path, *, max_subspaces: int = 4, max_rank: int = 8) -> Path:
    """Form B. Rows: the first subspaces; columns: the mean (when stored), then mapper columns M_k[:, j] as images
    at the mapper resolution (C x H' x W')."""
    c, h, w = syn.mapper_shape
    maps = syn.mappers.detach().float().cpu()  # [K, D', r], D' = C * H' * W'
    means = syn.means.detach().float().cpu() if syn.subspace_mean else None  # [K, D']
    k_show, r_show = min(max_subspaces, maps.shape[0]), min(max_rank, maps.shape[-1])
    first = 1 if means is not None else 0
    fig = Figure(figsize=(1.3 * (first + r_show), 1.3 * k_show + 0.6), layout="constrained")
    axes = fig.subplots(k_show, first + r_show, squeeze=False)

    def image(vec: torch.Tensor) -> np.ndarray:
        arr = vec.reshape(c, h, w).permute(1, 2, 0).numpy()  # [H', W', C]
        return arr if c == 3 else arr[:, :, 0]

    for k in range(k_show):
        if means is not None:
            _imshow(axes[k, 0], image(means[k]))
        for j in range(r_show):
            _imshow(axes[k, first + j], image(maps[k, :, j]))
            if k == 0:
                axes[0, first + j].set_title(f"r{j}", fontsize=7)
        axes[k, 0].set_ylabel(f"subspace {k}", fontsize=7)
    if means is not None:
        axes[0, 0].set_title("mean", fontsize=7)
    fig.suptitle(f"dimension mappers M_k (columns as {c}x{h}x{w} images)", fontsize=8)
    return _save_figure(fig, path)


def _plot_vector_codes(syn, path: Path, class_names, *, per_class: int = 16, max_classes: int = 10) -> Path:
    """Form B. One panel per class: the code vectors b_i [r] of its first images, one row each."""
    codes = syn.codes.detach().float().cpu()  # [n, r]
    classes = syn.labels_hard().cpu()
    k_show = min(max_classes, syn.num_classes)
    fig = Figure(figsize=(0.25 * codes.shape[1] + 1.2, 0.9 * k_show + 0.4))
    axes = fig.subplots(k_show, 1, squeeze=False)[:, 0]
    for k in range(k_show):
        idx = torch.nonzero(classes == k).flatten()[:per_class]
        _imshow(axes[k], codes[idx].numpy())
        axes[k].set_ylabel(str(class_names[k])[:12], fontsize=7)
    fig.suptitle("basis vectors / codes b_i (rows: images, columns: r)", fontsize=8)
    return _save_figure(fig, path)


def show_artifact(artifact, out_path) -> list[Path]:
    """Write the image grid at ``out_path`` (+ ``_clipped.png``); for low-rank sets (form A or B) also
    ``_mappers.png`` and ``_codes.png`` next to it. Returns the files written."""
    out_path = Path(out_path)
    pixels = artifact.images_pixels()
    hard = artifact.synthetic.labels_hard().cpu()  # rows = the class each image was distilled for
    names = artifact.class_names
    files = [save_grid(pixels, hard, names, out_path),
             save_grid(pixels, hard, names, _sibling(out_path, "_clipped.png"), clip_sigma=2.5)]
    syn = artifact.synthetic
    if getattr(syn, "kind", None) == "vector":
        files.append(_plot_vector_mappers(syn, _sibling(out_path, "_mappers.png")))
        files.append(_plot_vector_codes(syn, _sibling(out_path, "_codes.png"), names))
    elif hasattr(syn, "mappers_U") and hasattr(syn, "codes"):
        files.append(_plot_mappers(syn, _sibling(out_path, "_mappers.png")))
        files.append(_plot_codes(syn, _sibling(out_path, "_codes.png"), names))
    return files


def read_jsonl(path) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not a JSON line ({exc}); the log is damaged (a run killed "
                                 f"mid-write leaves a partial last line: delete it)") from exc
    return records


def _moving_average(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last ``window`` finite values (NaN-safe)."""
    ok = np.isfinite(y)
    s = np.cumsum(np.where(ok, y, 0.0))
    c = np.cumsum(ok.astype(float))
    s = np.concatenate([[0.0], s])
    c = np.concatenate([[0.0], c])
    i = np.arange(1, len(y) + 1)
    lo = np.maximum(i - window, 0)
    cnt = c[i] - c[lo]
    return np.where(cnt > 0, (s[i] - s[lo]) / np.maximum(cnt, 1), np.nan)


def _series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r["iteration"], r[key]) for r in records if r.get(key) is not None and r.get("iteration") is not None]
    if not pts:
        return np.array([]), np.array([])
    x, y = zip(*pts)
    return np.asarray(x, dtype=float), np.asarray(y, dtype=float)


def plot_curves(log_jsonl_path, out_path) -> Path:
    """Plot matching loss (+ moving average), learned lr, max start epoch and validation accuracy vs iteration."""
    records = read_jsonl(log_jsonl_path)
    x_loss, loss = _series(records, "loss")
    if loss.size == 0:
        raise ValueError(f"{log_jsonl_path}: no records with 'iteration' and 'loss'; is this a distillation log?")
    panels = [("loss", "matching loss")]
    for key, title in (("lr", "learned lr (alpha)"), ("max_start_epoch", "max start epoch"),
                       ("val_acc", "validation accuracy")):
        if _series(records, key)[1].size:
            panels.append((key, title))
    fig = Figure(figsize=(6, 2.2 * len(panels)))
    axes = fig.subplots(len(panels), 1, squeeze=False, sharex=True)[:, 0]
    for ax, (key, title) in zip(axes, panels):
        x, y = _series(records, key)
        if key == "loss":
            ax.plot(x, y, lw=0.6, alpha=0.4, label="loss")
            window = max(1, min(50, len(y) // 10))
            ax.plot(x, _moving_average(y, window), lw=1.5, label=f"moving average ({window})")
            ax.legend(fontsize=7)
        else:
            ax.plot(x, y, marker="o" if key == "val_acc" else None, ms=3, lw=1.2)
        ax.set_ylabel(title, fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("iteration")
    return _save_figure(fig, out_path)
