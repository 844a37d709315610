from .transformers.dit_sculpt import SculptDiT2DModel, SculptDiT2DOutput
from .unet_sculpt import SculptUNet2DModel, SculptUNet2DOutput


__all__ = ["SculptDiT2DModel", "SculptDiT2DOutput", "SculptUNet2DModel", "SculptUNet2DOutput"]
