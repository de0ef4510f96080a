"""One exception family per boundary; the CLI turns each into a one-line message."""


class TasklaneError(Exception):
    """Base of every error a user may see; its str() is the message to print."""


class RuntimeFailure(TasklaneError):
    """A process tasklane starts (etcd, Envoy, an app) could not start or died."""


class StoreError(TasklaneError):
    """etcd could not be reached or refused an operation."""


class RuleError(TasklaneError):
    """A rule file is invalid; the message names file, document and field."""
