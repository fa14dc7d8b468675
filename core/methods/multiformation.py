"""Multi-formation: distillers whose stored images are mosaics of factor x factor tiles.

IDC and IDM store each image as a mosaic; decoding splits it into tiles and upsamples each
to full size (`partition-expand`, see `ddsuite.core.synthetic.decode`). This mixin gives such
a distiller the factor check, the start from mosaics of downscaled real images, and the
decode record on the synthetic set. The config needs a ``factor`` option.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigError
from ..synthetic import SyntheticSet
from ..synthetic.decode import factor_problems, real_mosaics

__all__ = ["MultiFormation"]


class MultiFormation:
    """Mixin placed before `Distiller` (or a subclass of it) in the bases."""

    def check_factor(self) -> None:
        """Refuse a factor that does not divide the images' sides, naming the ones that do."""
        problems = factor_problems(self.config.factor, self.train.image_shape)
        if problems:
            raise ConfigError(problems, source=f"{self.name} config")

    def initial_images(self, init: str, generator: torch.Generator) -> Tensor:
        """With ``init: real`` and factor > 1, mosaics of downscaled real images."""
        factor = self.config.factor
        if init != "real" or factor == 1:
            return super().initial_images(init, generator)
        return real_mosaics(self.train, self.config.ipc, factor, generator).to(self.device)

    def initialize(self, generator: torch.Generator) -> SyntheticSet:
        """The starting set; with factor > 1 it decodes by partition and expansion."""
        syn = super().initialize(generator)
        if self.config.factor > 1:
            syn.decode = {"kind": "partition-expand", "factor": self.config.factor}
        return syn
