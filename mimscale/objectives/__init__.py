"""Loss plugins. Every objective, built-in or third-party, is registered by its ``mimscale.objectives`` entry
point (see pyproject.toml) and found through :func:`available` / :func:`objective_class`."""

from .base import LossOutput, Objective, StepContext, available, build_objective, objective_class, register

__all__ = ["LossOutput", "Objective", "StepContext", "available", "build_objective", "objective_class", "register"]
