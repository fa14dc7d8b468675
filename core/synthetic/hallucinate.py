"""HaBa's hallucinators: small networks that turn each stored base image into several images.

A set factorised as bases and hallucinators (Liu et al., NeurIPS 2022) stores ``ipc`` bases
per class and `count` hallucinators shared by every class. Hallucinator ``j`` maps a base
``x`` to ::

    x + decoder_j(scale_j * relu(encoder_j(x)) + shift_j)

with a 3x3 convolution from the image's channels to `channels` feature maps as the encoder,
a per-feature-map scale and shift as the affine step, and a 3x3 convolution back to the
image's channels as the decoder. The residual form (ours) makes every hallucination start
close to its base. All hallucinators run as one grouped convolution pair, so their weights
are four tensors whatever `count` is; `HALLUCINATOR_KEYS` names them, and an artifact stores
them beside the bases under the prefix ``decoder.``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DECODER_PREFIX", "HALLUCINATOR_KEYS", "Hallucinators", "hallucinator_shapes"]

DECODER_PREFIX = "decoder."
HALLUCINATOR_KEYS = ("encoder_weight", "encoder_bias", "scale", "shift", "decoder_weight",
                     "decoder_bias")


def hallucinator_shapes(count: int, image_channels: int,
                        channels: int) -> dict[str, tuple[int, ...]]:
    """The shape of every hallucinator tensor, by name."""
    return {
        "encoder_weight": (count * channels, image_channels, 3, 3),
        "encoder_bias": (count * channels,),
        "scale": (count, channels, 1, 1),
        "shift": (count, channels, 1, 1),
        "decoder_weight": (count * image_channels, channels, 3, 3),
        "decoder_bias": (count * image_channels,),
    }


class Hallucinators(nn.Module):
    """`count` hallucinators for images with `image_channels` channels.

    Args:
        count: hallucinators; every base decodes to this many images.
        image_channels: the images' channels.
        channels: feature maps of each hallucinator's encoder.
        decoder_gain: scale of the decoders' initial weights; small, so that hallucinations
            start near their bases.
    """

    def __init__(self, count: int, *, image_channels: int, channels: int,
                 decoder_gain: float = 0.1):
        super().__init__()
        self.count, self.image_channels, self.channels = count, image_channels, channels
        shapes = hallucinator_shapes(count, image_channels, channels)
        encoder = nn.Conv2d(image_channels, count * channels, 3, padding=1)
        decoder = nn.Conv2d(count * channels, count * image_channels, 3, padding=1,
                            groups=count)
        self.encoder_weight = nn.Parameter(encoder.weight.detach().clone())
        self.encoder_bias = nn.Parameter(encoder.bias.detach().clone())
        self.scale = nn.Parameter(torch.ones(shapes["scale"]))
        self.shift = nn.Parameter(torch.zeros(shapes["shift"]))
        self.decoder_weight = nn.Parameter(decoder.weight.detach().clone() * decoder_gain)
        self.decoder_bias = nn.Parameter(decoder.bias.detach().clone() * decoder_gain)

    def forward(self, bases: Tensor) -> Tensor:
        """(N, C, H, W) bases -> (N * count, C, H, W): base 0's hallucinations first, then
        base 1's, ..., so a class-major set stays class-major."""
        n, c, h, w = bases.shape
        features = F.relu(F.conv2d(bases, self.encoder_weight, self.encoder_bias, padding=1))
        features = features.view(n, self.count, self.channels, h, w)
        features = (features * self.scale + self.shift).view(n, -1, h, w)
        residual = F.conv2d(features, self.decoder_weight, self.decoder_bias, padding=1,
                            groups=self.count)  # (N, count * C, H, W)
        images = bases.unsqueeze(1) + residual.view(n, self.count, c, h, w)
        return images.flatten(0, 1)

    def tensors(self, *, cpu: bool = True) -> dict[str, Tensor]:
        """Detached tensors under their artifact keys (``decoder.<name>``): CPU copies to
        save, or (``cpu=False``) views where they live, to decode with."""
        out = {DECODER_PREFIX + name: getattr(self, name).detach() for name in HALLUCINATOR_KEYS}
        return {k: v.cpu().contiguous() for k, v in out.items()} if cpu else out

    @torch.no_grad()
    def load_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Copy tensors saved by `tensors()` back in place."""
        for name in HALLUCINATOR_KEYS:
            getattr(self, name).copy_(tensors[DECODER_PREFIX + name])

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], *, count: int, image_channels: int,
                     channels: int) -> "Hallucinators":
        """Rebuild saved hallucinators on the tensors' device (shapes checked by the caller,
        see `decode_problems`)."""
        device = tensors[DECODER_PREFIX + "scale"].device
        with torch.random.fork_rng(devices=[]):  # the throwaway init must not move the RNG
            module = cls(count, image_channels=image_channels, channels=channels)
        module = module.to(device)
        module.load_tensors(tensors)
        return module
