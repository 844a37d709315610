from .pipeline_sculpt import SculptPipeline


__all__ = ["SculptPipeline"]
