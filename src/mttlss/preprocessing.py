"""Preprocessing: pixel space [0, 1] <-> the training space networks see (mean/std normalisation or ZCA).

``Preprocessor.fit("normalize" | "zca" | "none", x_train)`` fits on pixel-space images [N, C, H, W] (normally
train minus validation, so the validation split stays unseen); calling it maps pixels to the training space,
``inverse`` maps back. Its ``state_dict()`` / ``meta()`` pair restores it exactly (``Preprocessor.from_state``):
experts folders and artifacts store both, so the ZCA never has to be refitted.
"""

from __future__ import annotations

from typing import Any

import torch

from mttlss.data import canonical_name

# Published per-channel mean / std of the pixel-space training images, in ONE place.
# CIFAR std (0.2023, 0.1994, 0.2010) is the DC / MTT / DD-Ranking convention (not the true std
# 0.2470, 0.2435, 0.2616); those code bases reuse the CIFAR-10 constants for CIFAR-100, and so do we,
# so that normalised images are interchangeable with theirs (docs/method.md 10.1).
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
}

# Named conventions a user may ask for (``--normalization NAME``): a table row above, or "computed" (mean/std of the
# images given to ``fit``). npz:/folder: copies of a listed dataset need a name to get the field's constants.
CONVENTIONS: tuple[str, ...] = (*NORMALIZATION, "computed")

_CHUNK_ROWS = 4096  # rows per matmul chunk in ZCA fit/apply: bounds temporary memory to ~100 MB

_SPACES = {"normalize": "normalized", "zca": "zca", "none": "pixel01"}


def _base_name(dataset: str) -> str:
    return canonical_name(dataset) if ":" not in dataset else dataset.split(":", 1)[0].lower()


def _eigh64(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigendecomposition of a symmetric float64 matrix: (eigenvalues ascending, eigenvectors as columns).

    On CPU, SciPy's divide-and-conquer LAPACK driver is used: for a 3072 x 3072 CIFAR covariance it took
    ~9 s where ``torch.linalg.eigh`` took ~60 s on a 2-core machine. On GPU, torch (cuSOLVER) is used.
    """
    if cov.device.type == "cpu":
        try:  # imported here for its measured cost: scipy.linalg adds ~0.2 s to every start, and only ZCA fits use it
            import scipy.linalg
        except ImportError:  # scipy is a dependency, but keep ZCA working without it
            return torch.linalg.eigh(cov)
        lam, u = scipy.linalg.eigh(cov.numpy(), driver="evd", overwrite_a=False, check_finite=True)
        return torch.from_numpy(lam), torch.from_numpy(u)
    return torch.linalg.eigh(cov)


def _fmt(t: torch.Tensor) -> str:
    return "(" + ", ".join(f"{v:.4f}" for v in t.cpu().tolist()) + ")"


class Preprocessor:
    """Maps pixel-space [0,1] images to the training space (mean/std 'normalized', or 'zca') and back.

    - ``normalize``: per-channel ``(x - mean) / std``; published constants (``NORMALIZATION``) for listed
      datasets, otherwise mean/std computed from the images given to ``fit``.
    - ``zca``: kornia ``ZCAWhitening(eps, compute_inv=True)`` semantics (method.md 10.1) on flattened images:
      ``x_zca = (x - mu) W``, ``x = x_zca W_inv + mu``, eps absolute.
    - ``none``: identity (space ``pixel01``), for runs without any preprocessing.
    """

    def __init__(self, *, kind: str, dataset: str, fitted_on: str, eps: float | None = None,
                 mean: torch.Tensor | None = None, std: torch.Tensor | None = None,
                 zca_mean: torch.Tensor | None = None, zca_matrix: torch.Tensor | None = None,
                 zca_inverse: torch.Tensor | None = None, source: str | None = None, convention: str | None = None):
        if kind not in _SPACES:
            raise ValueError(f"kind must be one of {sorted(_SPACES)}, got {kind!r}")
        self.kind = kind
        self.space = _SPACES[kind]
        self.dataset = dataset
        self.fitted_on = fitted_on
        self.eps = eps
        self.source = source  # normalize: "published" | "computed" | "user" (mean/std given)
        self.convention = convention  # normalize, published: the NORMALIZATION row used ("cifar10", ...)
        self.mean, self.std = mean, std  # normalize: [C] each
        self.zca_mean, self.zca_matrix, self.zca_inverse = zca_mean, zca_matrix, zca_inverse  # [D], [D, D], [D, D]
        if kind == "normalize" and (mean is None or std is None):
            raise ValueError("normalize needs mean and std")
        if kind == "zca" and (zca_mean is None or zca_matrix is None or zca_inverse is None):
            raise ValueError("zca needs zca_mean, zca_matrix and zca_inverse")

    # -- fitting ------------------------------------------------------------------------------------------

    @classmethod
    def fit(cls, kind: str, x_pixels: torch.Tensor, *, dataset: str, eps: float = 0.1,
            fitted_on: str = "train-minus-val", normalization: str | None = None,
            mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None) -> "Preprocessor":
        """Fit on pixel-space images ``x_pixels`` [N, C, H, W] (normally train minus validation).

        normalize: ``mean``/``std`` given by the user win; else ``normalization`` names a convention
        (``CONVENTIONS``: a published row, or "computed"); else the dataset's published row when it has one,
        otherwise computed from ``x_pixels``.
        """
        if kind not in _SPACES:
            raise ValueError(f"kind must be one of {sorted(_SPACES)}, got {kind!r}")
        if x_pixels.ndim != 4:
            raise ValueError(f"x_pixels must be [N, C, H, W], got shape {tuple(x_pixels.shape)}")
        if kind == "none":
            return cls(kind="none", dataset=dataset, fitted_on=fitted_on)
        if kind == "normalize":
            return cls._fit_normalize(x_pixels, dataset=dataset, fitted_on=fitted_on, normalization=normalization,
                                      mean=mean, std=std)
        return cls._fit_zca(x_pixels, dataset=dataset, eps=float(eps), fitted_on=fitted_on)

    @classmethod
    def _fit_normalize(cls, x: torch.Tensor, *, dataset: str, fitted_on: str, normalization: str | None,
                       mean: tuple[float, ...] | None, std: tuple[float, ...] | None) -> "Preprocessor":
        channels = x.shape[1]
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std (one value per channel each), or neither")
        if mean is not None:
            m, s = (torch.tensor([float(v) for v in vals], dtype=torch.float32) for vals in (mean, std))
            if m.numel() != channels or s.numel() != channels or not bool((s > 0).all()):
                raise ValueError(f"mean and std need {channels} values each (std > 0), got mean={list(mean)}, std={list(std)}")
            return cls(kind="normalize", dataset=dataset, fitted_on="given", mean=m, std=s, source="user")
        if normalization is not None and normalization not in CONVENTIONS:
            raise ValueError(f"normalization={normalization!r} is not one of {', '.join(CONVENTIONS)}")
        base = normalization if normalization is not None else _base_name(dataset)
        if base in NORMALIZATION:
            m, s = (torch.tensor(v, dtype=torch.float32) for v in NORMALIZATION[base])
            if m.numel() != channels:
                raise ValueError(f"{base!r} constants have {m.numel()} channels, images have {channels}")
            return cls(kind="normalize", dataset=dataset, fitted_on="published", mean=m, std=s,
                       source="published", convention=base)
        # float64 sums chunk by chunk: accurate, and no float64 copy of the whole set.
        s = torch.zeros(channels, dtype=torch.float64)
        s2 = torch.zeros(channels, dtype=torch.float64)
        for start in range(0, x.shape[0], _CHUNK_ROWS):
            chunk = x[start:start + _CHUNK_ROWS].to(torch.float32)
            # per-image float32 sums (H*W terms, accurate), then float64 across images and chunks
            s += chunk.sum(dim=(2, 3)).double().sum(0).cpu()
            s2 += (chunk * chunk).sum(dim=(2, 3)).double().sum(0).cpu()
        count = x.shape[0] * x.shape[2] * x.shape[3]
        mean = s / count
        std = (s2 / count - mean * mean).clamp_min(0).sqrt().clamp_min(1e-6)  # guard constant images
        return cls(kind="normalize", dataset=dataset, fitted_on=fitted_on, mean=mean.float(), std=std.float(),
                   source="computed")

    @classmethod
    def _fit_zca(cls, x: torch.Tensor, *, dataset: str, eps: float, fitted_on: str) -> "Preprocessor":
        n = x.shape[0]
        if n < 2:
            raise ValueError("ZCA needs at least 2 images (covariance divides by N - 1)")
        flat = x.reshape(n, -1)  # [N, D], pixel space (a view when x is contiguous)
        d = flat.shape[1]
        # Mean in float64; covariance as float32 products of centred row chunks summed in float64. float32 GEMMs
        # are fast everywhere (float64 is slow on consumer GPUs and 2x slower on CPU), the per-chunk error is
        # ~1e-7 relative, and the whole set is never copied.
        mu = torch.zeros(d, dtype=torch.float64, device=x.device)
        for start in range(0, n, _CHUNK_ROWS):
            mu += flat[start:start + _CHUNK_ROWS].sum(0, dtype=torch.float64)
        mu /= n
        mu32 = mu.float()
        cov = torch.zeros(d, d, dtype=torch.float64, device=x.device)
        for start in range(0, n, _CHUNK_ROWS):
            c = flat[start:start + _CHUNK_ROWS].to(torch.float32) - mu32
            cov += (c.T @ c).double()
        cov /= n - 1
        cov = 0.5 * (cov + cov.T)  # exactly symmetric for eigh
        lam, u = _eigh64(cov)
        lam = lam.clamp_min(0.0)  # round-off can make tiny eigenvalues negative; the SVD in kornia gives >= 0
        w = (u * (lam + eps).rsqrt()) @ u.T
        w_inv = (u * (lam + eps).sqrt()) @ u.T
        return cls(kind="zca", dataset=dataset, fitted_on=fitted_on, eps=eps, zca_mean=mu.float().cpu(),
                   zca_matrix=w.float().cpu(), zca_inverse=w_inv.float().cpu())

    # -- applying -----------------------------------------------------------------------------------------

    def _zca_apply(self, x: torch.Tensor, matrix: torch.Tensor, *, forward: bool) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(shape[0], -1)
        d = self.zca_mean.numel()
        if flat.shape[1] != d:
            raise ValueError(f"ZCA was fitted on {d} values per image, got images of shape {tuple(shape[1:])}")
        mu = self.zca_mean.to(x.device)
        matrix = matrix.to(x.device)
        out = torch.empty(flat.shape, dtype=torch.float32, device=x.device)
        for start in range(0, flat.shape[0], _CHUNK_ROWS):  # chunked: only a [chunk, D] temporary
            rows = flat[start:start + _CHUNK_ROWS].to(torch.float32)
            if forward:
                torch.mm(rows - mu, matrix, out=out[start:start + _CHUNK_ROWS])
            else:
                torch.addmm(mu, rows, matrix, out=out[start:start + _CHUNK_ROWS])
        return out.reshape(shape)

    def _channel_stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.ndim != 4 or x.shape[1] != self.mean.numel():
            raise ValueError(f"expected [B, {self.mean.numel()}, H, W] images, got shape {tuple(x.shape)}")
        return self.mean.to(x.device).view(1, -1, 1, 1), self.std.to(x.device).view(1, -1, 1, 1)

    def __call__(self, x_pixels: torch.Tensor) -> torch.Tensor:
        """Pixel space [B, C, H, W] -> training space, float32 on the same device."""
        x = x_pixels.to(torch.float32)
        if self.kind == "none":
            return x.clone() if x is x_pixels else x
        if self.kind == "normalize":
            mean, std = self._channel_stats(x)
            return (x - mean) / std
        return self._zca_apply(x, self.zca_matrix, forward=True)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        """Training space [B, C, H, W] -> pixel space (not clipped to [0, 1])."""
        x = x.to(torch.float32)
        if self.kind == "none":
            return x.clone()
        if self.kind == "normalize":
            mean, std = self._channel_stats(x)
            return x * std + mean
        return self._zca_apply(x, self.zca_inverse, forward=False)

    # -- persistence --------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors to store next to the synthetic set (CPU)."""
        if self.kind == "normalize":
            return {"preprocess.mean": self.mean.detach().cpu(), "preprocess.std": self.std.detach().cpu()}
        if self.kind == "zca":
            return {"zca.mean": self.zca_mean.detach().cpu(), "zca.matrix": self.zca_matrix.detach().cpu(),
                    "zca.inverse": self.zca_inverse.detach().cpu()}
        return {}

    def meta(self) -> dict:
        """JSON-able description; with ``state_dict()`` it restores this object exactly."""
        m: dict[str, Any] = {"kind": self.kind, "space": self.space, "eps": self.eps, "fitted_on": self.fitted_on,
                             "dataset": self.dataset, "mean": None, "std": None}
        if self.kind == "normalize":
            m.update(mean=self.mean.cpu().tolist(), std=self.std.cpu().tolist(), source=self.source,
                     convention=self.convention)
        elif self.kind == "zca":
            m["dim"] = int(self.zca_mean.numel())  # the ZCA mean is per pixel, so it lives in the tensors only
        return m

    @classmethod
    def from_state(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> "Preprocessor":
        kind = meta.get("kind")
        common = dict(dataset=meta.get("dataset", ""), fitted_on=meta.get("fitted_on", ""), eps=meta.get("eps"))
        if kind == "none":
            return cls(kind="none", **common)
        if kind == "normalize":
            # Tensors win (bit-exact); the JSON lists are a fallback (float32 -> JSON -> float32 is exact too).
            mean = tensors.get("preprocess.mean")
            std = tensors.get("preprocess.std")
            mean = mean.float().clone() if mean is not None else torch.tensor(meta["mean"], dtype=torch.float32)
            std = std.float().clone() if std is not None else torch.tensor(meta["std"], dtype=torch.float32)
            return cls(kind="normalize", mean=mean, std=std, source=meta.get("source"),
                       convention=meta.get("convention"), **common)
        if kind == "zca":
            missing = [k for k in ("zca.mean", "zca.matrix", "zca.inverse") if k not in tensors]
            if missing:
                raise ValueError(f"ZCA state is missing tensors {missing}; store Preprocessor.state_dict() with it")
            return cls(kind="zca", zca_mean=tensors["zca.mean"].float().clone(),
                       zca_matrix=tensors["zca.matrix"].float().clone(),
                       zca_inverse=tensors["zca.inverse"].float().clone(), **common)
        raise ValueError(f"meta['kind'] must be one of {sorted(_SPACES)}, got {kind!r}")

    def describe(self) -> str:
        """One line saying what this preprocessing is, e.g. for the CLI after an experts import."""
        if self.kind == "none":
            return "no preprocessing (pixels in [0, 1])"
        if self.kind == "zca":
            return (f"ZCA whitening (kornia-style, eps {self.eps:g}) fitted on the {self.fitted_on} split "
                    f"({self.zca_mean.numel()} values per image)")
        vals = f"mean {_fmt(self.mean)}, std {_fmt(self.std)}"
        if self.source == "published":
            return f"mean/std normalisation with the field's {self.convention or self.dataset} constants: {vals}"
        if self.source == "user":
            return f"mean/std normalisation with the given constants: {vals}"
        return f"mean/std normalisation computed from this copy's {self.fitted_on} images: {vals}"

    def to(self, device) -> "Preprocessor":
        """Move the stored tensors to ``device`` (in place); returns self."""
        for attr in ("mean", "std", "zca_mean", "zca_matrix", "zca_inverse"):
            t = getattr(self, attr)
            if t is not None:
                setattr(self, attr, t.to(device))
        return self

    def __repr__(self) -> str:
        return (f"Preprocessor(kind={self.kind!r}, dataset={self.dataset!r}, fitted_on={self.fitted_on!r}, "
                f"eps={self.eps})")
