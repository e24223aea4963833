"""Loss plugins. Importing this package registers the built-in objectives."""
from .base import (LossOutput, Objective, ObjectiveConfig, available, build_objective,  # noqa: F401
                   objective_class, register, StepContext)
from . import mae  # noqa: F401,E402  (registers)
from . import emae  # noqa: F401,E402  (registers)
from . import mapet  # noqa: F401,E402  (registers)
from . import conmim  # noqa: F401,E402  (registers)
from . import adpe  # noqa: F401,E402  (registers)
from . import dtm  # noqa: F401,E402  (registers)
