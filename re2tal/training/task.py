"""What a task is: everything that differs between the things re2tal trains.

The shared driver (`re2tal.training.driver.fit`) and worker loop (`re2tal.training.loop`) are
handed a `Task` and call its hooks; they never name a task. A task module (`re2tal.tasks.*`)
subclasses it, as a LightningModule is handed to Lightning's Trainer. The instance is pickled to
every worker, so it holds no open resources; what a worker caches on it (label maps, class scores)
is that worker's own.

    driver:  check_data -> predict_memory -> [workers] -> finish -> summary
    worker:  build_model, head, criterion -> at_start -> (dataset -> losses per micro-batch; evaluate) -> final_metrics
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from re2tal.config import Config

if TYPE_CHECKING:
    from re2tal.data.annotations import Annotations
    from re2tal.training.loop import Loop, State


class Task(ABC):
    name = "task"  # the MLflow tag `re2tal.task`
    loss_keys: tuple[str, ...] = ("loss",)  # what `losses` returns; `loss` is minimised

    # -- on the driver, before any worker starts ------------------------------------------------

    @abstractmethod
    def check_data(self, cfg: Config) -> "Annotations":
        """Read and check the annotations (BadInput names what is wrong); handed to every worker."""

    def predict_memory(self, cfg: Config) -> float | None:
        """Predicted per-worker peak memory (GB), announced and logged; None: no prediction."""
        return None

    # -- on every worker --------------------------------------------------------------------------

    @abstractmethod
    def build_model(self, cfg: Config) -> nn.Module:
        """The model, with a `backbone` attribute (the backbone learning rate applies to it)."""

    @abstractmethod
    def head(self, model: nn.Module) -> nn.Module:
        """The part of the model trained at the head learning rate."""

    @abstractmethod
    def criterion(self, cfg: Config) -> nn.Module:
        """The loss module: its state dict is saved per worker, `set_epoch(epoch)` is called at
        every epoch start."""

    def dataset(self, loop: "Loop", subset: str, training: bool, epoch: int = 0, start: int = 0):
        """This worker's share of a subset (training: the shuffle of `epoch`, from the shard's
        `start`-th video on): `videos` (the shard's videos in order) and `batches(batch_size,
        drop_last)` (collated batches, each with `video_id`). Default: clips decoded from the
        videos (`loop.shard`)."""
        return loop.shard(subset, training=training, epoch=epoch, start=start)

    @abstractmethod
    def losses(self, loop: "Loop", batch: dict) -> dict[str, Tensor]:
        """One training micro-batch: its input (e.g. `loop.frames(batch, training=True)`), the
        forward through `loop.engine` and the losses (`loss_keys`)."""

    @abstractmethod
    def evaluate(self, loop: "Loop", state: "State") -> dict[str, float]:
        """Evaluate on the validation subset (every worker its share); the metrics on every worker."""

    def at_start(self, loop: "Loop", state: "State") -> None:
        """Before the first step of a fresh run (not on resume)."""

    def final_metrics(self, loop: "Loop", state: "State") -> dict[str, float]:
        """Added to the last epoch's metrics (e.g. a chance level)."""
        return {}

    # -- on the driver, after the workers -------------------------------------------------------

    def finish(self, cfg: Config, metrics: dict[str, Any], tracker) -> dict[str, Any]:
        """What the task writes at the end of a finished run (`tracker`: the run's MLflow tracker,
        or None); returns the metrics with what it added."""
        return metrics

    def summary(self, metrics: dict[str, Any]) -> list[tuple[str, str]]:
        """The final table's rows: (label, formatted value), for the metrics present."""
        return []
