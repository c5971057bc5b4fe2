"""The recipe: one YAML file naming the base model, the task, the LoRA settings and the training setup.

``schema``: every key with its type, default and range (pydantic models); ``loading``: YAML reading,
``--set`` overrides and one-line errors that name the file and key; ``paths``: a recipe's local paths made
absolute, so that a run works from any folder.
"""

from lorakit.recipe.loading import load_recipe, load_trained_recipe, recipe_from_dict, save_recipe
from lorakit.recipe.paths import with_resolved_paths
from lorakit.recipe.schema import (
    GenerationSection,
    LoraSection,
    ModelSection,
    Recipe,
    TaskSection,
    TrainSection,
)

__all__ = [
    "GenerationSection",
    "LoraSection",
    "ModelSection",
    "Recipe",
    "TaskSection",
    "TrainSection",
    "load_recipe",
    "load_trained_recipe",
    "recipe_from_dict",
    "save_recipe",
    "with_resolved_paths",
]
