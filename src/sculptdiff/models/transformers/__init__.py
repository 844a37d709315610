from .dit_sculpt import SculptDiT2DModel, SculptDiT2DOutput


__all__ = ["SculptDiT2DModel", "SculptDiT2DOutput"]
