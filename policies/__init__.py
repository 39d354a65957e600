"""Learning policies: the gate that vetoes harmful updates, promotion, shadow mode and the learning loop."""

from policies.loading import PolicyError, load_policy
from policies.schema import (
    Expectation,
    Policy,
    Promotion,
    ProtectedBehaviour,
    Resources,
    RetentionSuite,
    Schedule,
    ShadowCriteria,
    TargetChecks,
    policy_schema,
)

__all__ = [
    "Expectation",
    "Policy",
    "PolicyError",
    "Promotion",
    "ProtectedBehaviour",
    "Resources",
    "RetentionSuite",
    "Schedule",
    "ShadowCriteria",
    "TargetChecks",
    "load_policy",
    "policy_schema",
]
