"""Multi-task data: the container, validation, splits, embedded datasets and benchmark loaders."""

from pyromtl.data.core import SPLITS, TASK_TYPES, Batch, MultiTaskData, TaskInfo

__all__ = ["SPLITS", "TASK_TYPES", "Batch", "MultiTaskData", "TaskInfo"]
