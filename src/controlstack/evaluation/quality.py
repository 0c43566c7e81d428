"""Image quality and text-image agreement: FID, KID and CLIP score, with their reference points.

* FID (Heusel et al. 2017) and KID (Bińkowski et al. 2018, the unbiased MMD² with the cubic
  polynomial kernel, averaged over random subsets) come from ``torchmetrics`` with the feature
  network of ``evaluation/networks.py`` plugged in as its custom extractor; images enter as uint8
  and are resized by clean-fid's rule inside the network.
* CLIP score (Hessel et al. 2021): ``100 · max(cos(E_I(x), E_T(c)), 0)`` averaged over pairs.

A number alone says little, so :func:`reference` measures each metric's ceiling and floor on the
same real scenes: the CLIP score of the real renders with their own captions and with shuffled
ones, and the FID / KID between two halves of the real renders (what two samples of the *same*
distribution score at this set size -- FID is biased upward at small N).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from controlstack.errors import require

KID_SUBSETS = 100
#: Scenes per feature below which ``evaluate`` warns that FID is not meaningful. FID fits a Gaussian
#: to each set's features, and its covariance is rank-deficient below as many images as features
#: (pytorch-fid's advice: N >= 2048 for Inception's 2048-d pool features); the report's real-vs-real
#: reference compares two *halves* of the scenes, so each half needs that many: N >= 2 x features,
#: 128 scenes for the bundled 64-d network. Measured there (held-out renders against disjoint
#: renders, true FID 0): FID ~ 300 / N -- 77 at N = 4, 8.2 at 32, 3.6 at 64, 1.8 at 128 -- and the
#: split-half reference scores 68 at 4 scenes, 11 at 32, 4.4 at 64, 3.3 at 128: below 2 x features
#: the bias alone is as large as the differences FID is read for (a VAE round trip adds ~4).
FID_SCENES_PER_FEATURE = 2


def fid_min_scenes(num_features: int) -> int:
    """Scenes an evaluation needs before its FID means something (:data:`FID_SCENES_PER_FEATURE`)."""
    return FID_SCENES_PER_FEATURE * int(num_features)


#: Why a KID can be negative, for the report and metrics.json (KID: Bińkowski et al. 2018)
KID_NOTE = ("KID is an unbiased estimate of the squared MMD: its true value is >= 0, but the estimate scatters "
            "around it, widely at small N, so a KID whose true value is near 0 (the real-vs-real split) or one "
            "from few scenes can come out negative; read a negative KID as no difference measurable at this N")


def small_sample_note(scenes: int, num_features: int) -> str | None:
    """The one-line warning for an evaluation too small for FID (None from ``fid_min_scenes`` up)."""
    need = fid_min_scenes(num_features)
    if scenes >= need:
        return None
    return (f"{scenes} scenes is below the {need} FID needs with this feature network ({FID_SCENES_PER_FEATURE} x its "
            f"{num_features} features, so each half of the real-vs-real reference has a full-rank covariance): "
            "FID here is mostly small-sample bias, the real-vs-real FID can exceed the rows', and KID can be "
            "negative; use more --scenes before reading FID")


def _batch(images) -> torch.Tensor:
    """uint8 (H, W, 3) arrays or PIL images -> uint8 (B, 3, H, W)."""
    a = np.stack([np.asarray(im.convert("RGB") if hasattr(im, "convert") else im, np.uint8) for im in images])
    return torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()


def features(network, images, batch_size: int = 64) -> torch.Tensor:
    """The network's features of a list of images, in batches (float64, for the statistics)."""
    out = [network(_batch(images[i:i + batch_size])) for i in range(0, len(images), batch_size)]
    return torch.cat(out).double()


class FidKid:
    """FID and KID (mean over ``KID_SUBSETS`` subsets of min(50, N) images) of image sets against
    one real set, whose features are computed once (torchmetrics keeps them across ``reset``)."""

    def __init__(self, network, real, seed: int = 0):
        from torchmetrics.image.fid import FrechetInceptionDistance  # local: heavy, only this path needs it
        from torchmetrics.image.kid import KernelInceptionDistance  # local: heavy, only this path needs it

        require(len(real) >= 2, f"FID / KID need >= 2 images per set, got {len(real)} real")
        self.n_real, self.seed = len(real), seed
        self.fid = FrechetInceptionDistance(feature=network, reset_real_features=False, normalize=False)
        with warnings.catch_warnings():  # "KID keeps all features in memory": a few thousand rows at most here
            warnings.simplefilter("ignore", UserWarning)
            self.kid = KernelInceptionDistance(feature=network, subsets=KID_SUBSETS, subset_size=2,
                                               reset_real_features=False, normalize=False)
        self._update(real, True)

    def _update(self, images, real: bool) -> None:
        for i in range(0, len(images), 64):
            b = _batch(images[i:i + 64])
            self.fid.update(b, real=real)
            self.kid.update(b, real=real)

    def __call__(self, fake) -> dict[str, float]:
        require(len(fake) >= 2, f"FID / KID need >= 2 images per set, got {self.n_real} and {len(fake)}")
        self.fid.reset()  # the previous set's features go, the real ones stay
        self.kid.reset()
        self._update(fake, False)
        self.kid.subset_size = min(50, self.n_real, len(fake))
        with torch.random.fork_rng(devices=[]):  # KID draws its subsets from the global generator: seed it, then restore it
            torch.manual_seed(self.seed)
            kid_mean, _ = self.kid.compute()
        return {"fid": float(self.fid.compute()), "kid": float(kid_mean)}


def fid_kid(network, real, fake, seed: int = 0) -> dict[str, float]:
    """FID and KID between two sets (:class:`FidKid` for one real set against several)."""
    require(len(real) >= 2 and len(fake) >= 2, f"FID / KID need >= 2 images per set, got {len(real)} and {len(fake)}")
    return FidKid(network, real, seed)(fake)


def clip_score(scorer, images, texts: list[str]) -> float:
    """Mean CLIP score ``100 · max(cos, 0)`` of (image, text) pairs."""
    scores = np.concatenate([scorer.scores(images[i:i + 64], texts[i:i + 64]) for i in range(0, len(texts), 64)])
    return float(scores.mean())


def shuffled(texts: list[str]) -> list[str]:
    """Each text replaced by another scene's (a cyclic shift: no text keeps its own image)."""
    return texts[1:] + texts[:1]


def reference(network, scorer, real, captions: list[str]) -> dict[str, float]:
    """The metrics' reference points on the real images of the evaluated scenes."""
    half = len(real) // 2
    out = {"clip_real_matched": clip_score(scorer, real, captions),
           "clip_real_shuffled": clip_score(scorer, real, shuffled(captions))}
    if half >= 2:
        split = fid_kid(network, real[:half], real[half:2 * half])
        out.update(fid_real_split=split["fid"], kid_real_split=split["kid"])
    else:
        out.update(fid_real_split=float("nan"), kid_real_split=float("nan"))
    return out
