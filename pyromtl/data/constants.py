"""Names shared by the data container and its validation: task types and split names.

They live here, apart from :mod:`pyromtl.data.core`, so that :mod:`pyromtl.data.validate`
can use them without importing the container (which imports the validation).
"""

from __future__ import annotations

TASK_TYPES: tuple[str, ...] = ("classification", "binary", "regression")
#: Integer code of each task type, as models broadcast it over tasks (``TaskInfo.type_code``).
TYPE_CODE: dict[str, int] = {name: code for code, name in enumerate(TASK_TYPES)}
SPLITS: tuple[str, ...] = ("train", "val", "test")
#: Label of an unlabelled pixel in a segmentation map (dense tasks, :mod:`pyromtl.data.dense`).
IGNORE_INDEX: int = -1
