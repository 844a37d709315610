"""sculptdiff: a U-Net, DDPM/DDIM and rectified-flow schedulers and a classifier-free-guidance pipeline for diffusers.

The module paths of the components are part of the saved format: `save_pretrained` records them in
`model_index.json`, so they never move without a re-export.
"""

from .models.transformers.dit_sculpt import SculptDiT2DModel, SculptDiT2DOutput
from .models.unet_sculpt import SculptUNet2DModel, SculptUNet2DOutput
from .pipelines.sculpt.pipeline_sculpt import SculptPipeline
from .schedulers.scheduling_sculpt import SculptScheduler, SculptSchedulerOutput
from .schedulers.scheduling_sculpt_flow import SculptFlowScheduler, SculptFlowSchedulerOutput


__version__ = "0.1.0"

__all__ = [
    "SculptDiT2DModel",
    "SculptDiT2DOutput",
    "SculptFlowScheduler",
    "SculptFlowSchedulerOutput",
    "SculptPipeline",
    "SculptScheduler",
    "SculptSchedulerOutput",
    "SculptUNet2DModel",
    "SculptUNet2DOutput",
]
