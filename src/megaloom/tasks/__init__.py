"""Training tasks: how samples become micro-batches, the loss, and what is counted.

`build_task(config, ...)` returns the `Task` for `config.task.name`; the trainer calls only
the `Task` interface (`megaloom.tasks.base`), so pretraining, SFT and classification run on
every parallel layout through the same loop.
"""

from megaloom.tasks.base import EpochShuffled, Task
from megaloom.tasks.lm import LanguageModelTask

__all__ = ["EpochShuffled", "LanguageModelTask", "Task"]
