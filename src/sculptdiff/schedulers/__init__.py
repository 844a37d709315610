from .scheduling_sculpt import SculptScheduler, SculptSchedulerOutput
from .scheduling_sculpt_flow import SculptFlowScheduler, SculptFlowSchedulerOutput


__all__ = ["SculptFlowScheduler", "SculptFlowSchedulerOutput", "SculptScheduler", "SculptSchedulerOutput"]
