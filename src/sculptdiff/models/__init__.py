from .unet_sculpt import SculptUNet2DModel, SculptUNet2DOutput


__all__ = ["SculptUNet2DModel", "SculptUNet2DOutput"]
