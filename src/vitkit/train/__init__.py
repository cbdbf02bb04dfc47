"""Training on Lightning: config and recipes, the run plan, the LightningModule, replayable batches, the run."""

from vitkit.train.callbacks import AtomicCheckpointIO, NonFiniteWeightsError, TrainingInterrupted
from vitkit.train.config import TrainConfig, parse_duration, read_recipe, recipe_names, resolve_config
from vitkit.train.module import NonFiniteLossError, ViTClassifier
from vitkit.train.plan import RunPlan
from vitkit.train.run import RunResult, resume_checkpoint, saved_train_config, train

__all__ = [
    "AtomicCheckpointIO",
    "NonFiniteLossError",
    "NonFiniteWeightsError",
    "RunPlan",
    "RunResult",
    "TrainConfig",
    "TrainingInterrupted",
    "ViTClassifier",
    "parse_duration",
    "read_recipe",
    "recipe_names",
    "resolve_config",
    "resume_checkpoint",
    "saved_train_config",
    "train",
]
