"""Generic one-for-one supervision runtime on trio, modelled on Erlang/OTP supervisors.

Knows nothing about payments: a tree is a list of ChildSpecs run by a Supervisor.
"""

from supervisor.backoff import Backoff, RestartIntensity
from supervisor.signals import run_until_signal
from supervisor.spec import ChildContext, ChildSpec, RestartPolicy
from supervisor.status import ChildState, ChildStatus
from supervisor.supervisor import Supervisor, SupervisorEscalation

__all__ = [
    "Backoff",
    "ChildContext",
    "ChildSpec",
    "ChildState",
    "ChildStatus",
    "RestartIntensity",
    "RestartPolicy",
    "Supervisor",
    "SupervisorEscalation",
    "run_until_signal",
]
