"""One exception family per boundary; the CLI turns each into a one-line message."""


class TasklaneError(Exception):
    """Base of every error a user may see; its str() is the message to print."""


class RuntimeFailure(TasklaneError):
    """A process tasklane starts (etcd, Envoy, an app) could not start or died."""


class StoreError(TasklaneError):
    """etcd could not be reached or refused an operation."""


class RuleError(TasklaneError):
    """A rule file is invalid; the message names file, document and field."""


# So a file with hundreds of broken documents still gives a readable answer.
MAX_PROBLEMS_SHOWN = 50


def rule_errors(problems: list[str]) -> RuleError:
    """One RuleError for several problems, one line each (the CLI prints each as its own
    `tasklane: error:` line), the first MAX_PROBLEMS_SHOWN of them."""
    shown = problems[:MAX_PROBLEMS_SHOWN]
    if len(problems) > len(shown):
        shown.append(f"... and {len(problems) - len(shown)} more problems")
    return RuleError("\n".join(shown))
