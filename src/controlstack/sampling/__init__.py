"""The one sampling loop and the scheduler names (see ``loop.py``, ``schedulers.py``)."""

from controlstack.sampling.loop import Step, sample
from controlstack.sampling.schedulers import SCHEDULERS, make_scheduler

__all__ = ["SCHEDULERS", "Step", "make_scheduler", "sample"]
