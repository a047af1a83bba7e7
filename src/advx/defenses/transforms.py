"""Input transforms as classifier wrappers: the model sees ``fn(x)`` instead of ``x``.

``BitDepth`` and ``MedianSmoothing`` are the squeezers of feature squeezing (Xu et al., 2018),
``JPEG`` the compression defense (Das et al., 2017; Guo et al., 2018), ``RandomNoise`` a
randomized defense (Gaussian noise on every pass; attack it through :class:`~advx.defenses.EOT`).

Transforms that are not differentiable (rounding, a median's selection, JPEG) are attacked with
BPDA (Athalye et al., 2018): the forward pass applies the transform, the backward pass treats it
as the identity, so gradient attacks see through it. That is on by default (``bpda=True``);
``bpda=False`` gives whatever gradient torch computes (zero through rounding, none through
JPEG), which is what a naive evaluation sees and what the audit's sanity checks flag.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from functools import partial

import numpy as np
import torch
from torch import Tensor

from .._validate import check_int, nonneg_float
from ..errors import InputError
from ..models.classifier import as_model
from ._base import Defense, graph, straight_through

__all__ = [
    "Transformed",
    "BitDepth",
    "MedianSmoothing",
    "JPEG",
    "RandomNoise",
    "bit_depth",
    "median_smooth",
    "jpeg_compress",
]


# ---- the transforms, as functions of a batch ---------------------------------------------------
def bit_depth(x: Tensor, bits: int, bounds: tuple[float, float] = (0.0, 1.0)) -> Tensor:
    """Round each value to one of 2**bits evenly spaced levels spanning ``bounds``."""
    lo, hi = bounds
    levels = 2**bits - 1
    return torch.round((x - lo) / (hi - lo) * levels) / levels * (hi - lo) + lo


def _pad_symmetric(x: Tensor, dim: int, before: int, after: int) -> Tensor:
    """Pad by mirroring with the edge value repeated (``d c b a | a b c d | d c b a``)."""
    parts = []
    if before:
        parts.append(x.narrow(dim, 0, before).flip(dim))
    parts.append(x)
    if after:
        parts.append(x.narrow(dim, x.shape[dim] - after, after).flip(dim))
    return torch.cat(parts, dim=dim) if len(parts) > 1 else x


def median_smooth(x: Tensor, size: int) -> Tensor:
    """A ``size`` x ``size`` median filter on each channel of (N, C, H, W) images.

    As in feature squeezing's reference code (scipy's ``median_filter`` with ``mode="reflect"``):
    symmetric padding with the edge value repeated, the extra row and column of an even window
    before the pixel, and for an even window the upper of the two middle values (no averaging:
    the output is always one of the inputs).
    """
    _check_images4d(x, "median smoothing")
    if size > min(x.shape[2], x.shape[3]):
        raise InputError(
            f"median smoothing: a {size}x{size} window does not fit {tuple(x.shape[2:])} images"
        )
    before = size // 2
    after = size - 1 - before
    padded = _pad_symmetric(_pad_symmetric(x, 2, before, after), 3, before, after)
    windows = padded.unfold(2, size, 1).unfold(3, size, 1)  # (N, C, H, W, size, size)
    windows = windows.reshape(*x.shape, size * size)  # -> (N, C, H, W, size*size)
    # kthvalue counts from 1: the (size^2 // 2)-th value from 0 is the (upper) median
    return windows.kthvalue(size * size // 2 + 1, dim=-1).values


def jpeg_compress(x: Tensor, quality: int = 75, bounds: tuple[float, float] = (0.0, 1.0)) -> Tensor:
    """Each image through an 8-bit JPEG encoding and back, in memory (needs Pillow).

    (N, 1, H, W) images are encoded as grayscale, (N, 3, H, W) as RGB.
    """
    Image = _pillow("jpeg_compress")
    _check_images4d(x, "JPEG")
    if x.shape[1] not in (1, 3):
        raise InputError(f"JPEG: expected 1 (grayscale) or 3 (RGB) channels, got {x.shape[1]}")
    lo, hi = bounds
    levels = ((x.detach() - lo) / (hi - lo) * 255).round().clamp(0, 255).to(torch.uint8)
    pixels = levels.permute(0, 2, 3, 1).cpu().numpy()  # (N, C, H, W) -> (N, H, W, C)
    out = np.empty_like(pixels)
    for i, image in enumerate(pixels):  # Pillow encodes one image at a time
        buf = io.BytesIO()
        pil = Image.fromarray(image[..., 0] if image.shape[2] == 1 else image)  # L or RGB
        pil.save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        decoded = np.asarray(Image.open(buf))
        out[i] = decoded.reshape(image.shape)
    back = (
        torch.from_numpy(out).to(device=x.device).permute(0, 3, 1, 2)
    )  # (N, H, W, C) -> (N, C, H, W)
    return back.to(x.dtype) / 255 * (hi - lo) + lo


def _pillow(who: str):
    try:
        from PIL import Image
    except ImportError:
        raise InputError(
            f"{who}: JPEG needs Pillow; install it with pip install 'advx[image]'"
        ) from None
    return Image


def _check_images4d(x: Tensor, who: str) -> None:
    if x.dim() != 4:
        raise InputError(
            f"{who}: expected images of shape (N, C, H, W), got shape {tuple(x.shape)}"
        )


# ---- the wrappers -------------------------------------------------------------------------------
class Transformed(Defense):
    """``model`` applied to ``fn(x)``.

    Args:
        model: the classifier to defend (any advx Model, or an ``nn.Module``).
        fn: maps a batch in input space to a batch of the same shape, inside the same bounds.
        differentiable: ``fn`` has useful torch gradients; they are used as they are.
        bpda: for a non-differentiable ``fn``: identity on the backward pass (the default).
            ``False`` gives torch's gradient through ``fn`` (usually zero or none).
        name: shown in reprs and reports.
    """

    def __init__(
        self,
        model,
        fn: Callable[[Tensor], Tensor],
        *,
        differentiable: bool = False,
        bpda: bool = True,
        name: str | None = None,
    ) -> None:
        if not callable(fn):
            raise InputError(
                "fn: expected a callable that maps a batch of inputs to a batch, "
                f"got {type(fn).__name__}"
            )
        super().__init__(
            model, name=name or f"Transformed(fn={getattr(fn, '__name__', type(fn).__name__)})"
        )
        self.fn = fn
        self.differentiable = bool(differentiable)
        self.bpda = bool(bpda)

    def transform(self, x: Tensor) -> Tensor:
        """``fn(x)``, differentiable the way this wrapper is attacked (BPDA or torch's gradient)."""
        if self.differentiable or not self.bpda or not torch.is_grad_enabled():
            return self.fn(x)
        return straight_through(self.fn, x)

    def forward(self, x: Tensor) -> Tensor:
        return graph(self.model, self.transform(x))

    def labels(self, x: Tensor) -> Tensor:
        return self.model.labels(self.fn(x))  # works for label-only models too

    def __repr__(self) -> str:
        kind, _, args = self.name.partition("(")
        args = args[:-1] if args.endswith(")") else ""
        how = "" if self.differentiable else f"bpda={self.bpda}"
        return f"{kind}({', '.join(a for a in (repr(self.model), args, how) if a)})"


class BitDepth(Transformed):
    """Feature squeezing's colour-depth reduction: 2**bits levels within the model's bounds."""

    def __init__(self, model, bits: int, *, bpda: bool = True) -> None:
        check_int(bits, name="bits", who="BitDepth", low=1, high=16)
        model = as_model(model)
        super().__init__(
            model,
            partial(bit_depth, bits=bits, bounds=tuple(model.bounds)),
            bpda=bpda,
            name=f"BitDepth(bits={bits})",
        )
        self.bits = bits


class MedianSmoothing(Transformed):
    """Feature squeezing's median filter, ``size`` x ``size`` per channel (2 or 3 in the paper).

    The median selects one input of each window, so torch's gradient exists but reaches only
    the selected pixels; BPDA (the default) passes the gradient to every pixel instead.
    """

    def __init__(self, model, size: int = 2, *, bpda: bool = True) -> None:
        check_int(size, name="size", who="MedianSmoothing", low=2, hint="2 or 3 in the paper")
        super().__init__(
            model,
            partial(median_smooth, size=size),
            bpda=bpda,
            name=f"MedianSmoothing(size={size})",
        )
        self.size = size

    def check_input(self, x: Tensor) -> None:
        _check_images4d(x, self.name)
        super().check_input(x)


class JPEG(Transformed):
    """JPEG compression at ``quality`` (1-95) of each image, in memory (needs Pillow).

    A host round trip per call: one image at a time through Pillow's encoder.
    """

    def __init__(self, model, quality: int = 75, *, bpda: bool = True) -> None:
        _pillow("JPEG")
        check_int(quality, name="quality", who="JPEG", low=1, high=95)
        model = as_model(model)
        super().__init__(
            model,
            partial(jpeg_compress, quality=quality, bounds=tuple(model.bounds)),
            bpda=bpda,
            name=f"JPEG(quality={quality})",
        )
        self.quality = quality

    def check_input(self, x: Tensor) -> None:
        _check_images4d(x, self.name)
        if x.shape[1] not in (1, 3):
            raise InputError(
                f"{self.name}: expected 1 (grayscale) or 3 (RGB) channels, got {x.shape[1]}"
            )
        super().check_input(x)


class RandomNoise(Transformed):
    """A randomized defense: Gaussian noise of standard deviation ``sigma`` (in input units) is
    added to the input on every pass, drawn from the global torch RNG as a deployed model would.

    As in randomized smoothing, the noisy input is not clipped to the bounds. One pass is one
    random draw: attack it with :class:`~advx.defenses.EOT`.
    """

    def __init__(self, model, sigma: float) -> None:
        nonneg_float(sigma, name="sigma", who="RandomNoise")
        super().__init__(
            model, self._noisy, differentiable=True, name=f"RandomNoise(sigma={sigma:g})"
        )
        self.sigma = float(sigma)

    def _noisy(self, x: Tensor) -> Tensor:
        return x + self.sigma * torch.randn_like(x)
