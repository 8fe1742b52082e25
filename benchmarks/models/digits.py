"""8x8 digits: an eps-prediction UNet, a classifier and a Fréchet distance.

Data: sklearn's ``load_digits`` (1797 images, 8x8, pixel values 0..16),
scaled to ``[-1, 1]`` by ``pixel / 8 - 1``, shape ``[N, 1, 8, 8]``, float32.
A fixed permutation (seed 0) splits it 80/20: 1438 "train", 359 "test".
Both the UNet and the classifier were trained on "train" only.

The UNet follows the conventions of :mod:`benchmarks.models.common`
(linear DDPM schedule, 1000 training steps, ``model(x, t) -> eps`` with
``t`` an int or float ``Tensor[B]`` of training timesteps).

The Fréchet distance is an FID analogue: it compares the means and
covariances of the classifier's 64-dim penultimate features.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Tuple, Union

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from .common import EpsModel, TimeEmbedding, load_weights

SPLIT_SEED = 0
TRAIN_FRACTION = 0.8
UNET_FILE = "digits_unet.pt"
CLASSIFIER_FILE = "digits_classifier.pt"


# --------------------------------------------------------------------- data
@lru_cache(maxsize=1)
def _all_digits() -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 8.0 - 1.0)[:, None, :, :]
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(x))
    return x, y, perm


def digits_data(split: str = "train", return_labels: bool = False):
    """The digits as ``Tensor[N, 1, 8, 8]`` float32 in ``[-1, 1]``.

    ``split``: ``"train"`` (1438 images), ``"test"`` (359) or ``"all"``
    (1797, in sklearn's order). With ``return_labels=True`` returns
    ``(images, labels)`` with ``labels: LongTensor[N]``.
    """
    x, y, perm = _all_digits()
    n_train = int(round(TRAIN_FRACTION * len(x)))
    if split == "train":
        idx = perm[:n_train]
    elif split == "test":
        idx = perm[n_train:]
    elif split == "all":
        idx = np.arange(len(x))
    else:
        raise ValueError(f"split must be 'train', 'test' or 'all', not {split!r}")
    images = torch.from_numpy(x[idx].copy())
    if return_labels:
        return images, torch.from_numpy(y[idx].copy())
    return images


# --------------------------------------------------------------------- UNet
class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv, + time embedding, GroupNorm-SiLU-Conv, residual."""

    def __init__(self, c_in: int, c_out: int, t_dim: int, groups: int = 8):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.temb = nn.Linear(t_dim, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class DigitsUNet(EpsModel):
    """Small eps-prediction UNet for ``[B, 1, 8, 8]``: one level at 8x8
    (``ch`` channels), one down/up level at 4x4 (``2 ch``), skip connection."""

    def __init__(self, ch: int = 32, t_dim: int = 128):
        super().__init__()
        self.time = TimeEmbedding(t_dim)
        self.conv_in = nn.Conv2d(1, ch, 3, padding=1)
        self.down_block = ResBlock(ch, ch, t_dim)
        self.down = nn.Conv2d(ch, 2 * ch, 3, stride=2, padding=1)  # 8x8 -> 4x4
        self.mid1 = ResBlock(2 * ch, 2 * ch, t_dim)
        self.mid2 = ResBlock(2 * ch, 2 * ch, t_dim)
        self.up = nn.Conv2d(2 * ch, ch, 3, padding=1)  # after nearest 4x4 -> 8x8
        self.up_block = ResBlock(2 * ch, ch, t_dim)  # input: concat(up, skip)
        self.norm_out = nn.GroupNorm(8, ch)
        self.conv_out = nn.Conv2d(ch, 1, 3, padding=1)

    def _forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.time(t)
        h = self.conv_in(x)
        skip = self.down_block(h, temb)
        h = self.down(skip)
        h = self.mid2(self.mid1(h, temb), temb)
        h = self.up(F.interpolate(h, scale_factor=2, mode="nearest"))
        h = self.up_block(torch.cat([h, skip], dim=1), temb)
        return self.conv_out(F.silu(self.norm_out(h)))


# --------------------------------------------------------------- classifier
class DigitsClassifier(nn.Module):
    """Small CNN: 8x8 -> 4x4 -> 2x2 -> 64-dim features -> 10 logits.

    Expects images in the UNet's data scale (``[-1, 1]``); any floating dtype
    (computed in the parameters' dtype)."""

    FEATURE_DIM = 64

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # 4x4
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # 2x2
            nn.Flatten(),
            nn.Linear(64 * 4, self.FEATURE_DIM), nn.ReLU(),
        )
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(self.FEATURE_DIM, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations, ``Tensor[B, 64]`` (float32)."""
        p = next(self.parameters())
        return self.body(x.to(p.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``Tensor[B, 10]``."""
        return self.head(self.dropout(self.features(x)))


# ------------------------------------------------------------------ loading
def load_digits_unet(device: Union[str, torch.device] = "cpu") -> DigitsUNet:
    """The trained digits UNet (EMA weights), eval mode, grads off."""
    return load_weights(DigitsUNet(), UNET_FILE, device)


def load_digits_classifier(device: Union[str, torch.device] = "cpu") -> DigitsClassifier:
    """The trained digits classifier, eval mode, grads off."""
    return load_weights(DigitsClassifier(), CLASSIFIER_FILE, device)


# ------------------------------------------------------------------ metrics
def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets
    ``Tensor[N, D]`` and ``Tensor[M, D]`` (computed in float64)::

        ||mu_a - mu_b||^2 + tr(C_a + C_b - 2 (C_a C_b)^{1/2})

    ``tr (C_a C_b)^{1/2}`` (what ``scipy.linalg.sqrtm`` + real part gives for
    well-conditioned covariances) is computed as the sum of the square roots
    of the eigenvalues of the symmetric PSD matrix ``C_a^{1/2} C_b C_a^{1/2}``,
    which has the same eigenvalues as ``C_a C_b``. Unlike ``sqrtm`` this stays
    real and accurate for singular covariances (e.g. dead ReLU features or
    fewer samples than dimensions).
    """
    a = torch.as_tensor(feats_a).detach().cpu().double().numpy()
    b = torch.as_tensor(feats_b).detach().cpu().double().numpy()
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need [N, D] and [M, D] features, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError("need at least 2 samples in each set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a = np.atleast_2d(np.cov(a, rowvar=False))
    cov_b = np.atleast_2d(np.cov(b, rowvar=False))
    w, v = np.linalg.eigh(cov_a)
    sqrt_a = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    m = sqrt_a @ cov_b @ sqrt_a
    tr_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum())
    diff = mu_a - mu_b
    # rounding (which BLAS threads vary) can leave -1e-14 for identical sets; a distance is >= 0
    return max(0.0, float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * tr_covmean))


@torch.no_grad()
def digits_frechet(samples: torch.Tensor, reference: str = "test", classifier: nn.Module = None) -> float:
    """FID-like score of digit samples ``Tensor[N, 1, 8, 8]`` (data scale
    ``[-1, 1]``) against ``digits_data(reference)``, in classifier features.
    Lower is better; note it is biased upward for small N."""
    clf = classifier if classifier is not None else load_digits_classifier()
    dev = next(clf.parameters()).device
    fa = clf.features(samples.to(dev))
    fb = clf.features(digits_data(reference).to(dev))
    return frechet_distance(fa, fb)
