"""The scaler: task groups exist only while their chain's runs need them.

`profile` predicts from cron, time zones and run history which group needs how many replicas
when; `policy` turns that, measured start-up times and metrics into one explained decision
per group each sync period; `actuators` carry decisions out; `simulate` replays a workload
(`workload`) under this policy and the usual alternatives on a virtual clock, against the
least any schedule could cost (`oracle`). Everything but the actuators is pure: time,
rules, history and observations are arguments.
"""

from controlplane.scaler.policy import Decision, Observation, Policy, PolicyConfig
from controlplane.scaler.profile import Window, expected_duration, profile, windows

__all__ = [
    "Decision",
    "Observation",
    "Policy",
    "PolicyConfig",
    "Window",
    "expected_duration",
    "profile",
    "windows",
]
