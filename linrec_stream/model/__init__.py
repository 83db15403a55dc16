"""The model layer: attention ops, the LinRec transformer, per-user state and the run directory.

Imports only torch and itself (never training, data, Kafka or the worker), so a stream worker
that serves a model loads nothing else.
"""

from .linrec import LinRecModel, ModelConfig
from .user_state import StateFormatError, StateMismatchError, UserState

__all__ = ["LinRecModel", "ModelConfig", "StateFormatError", "StateMismatchError", "UserState"]
