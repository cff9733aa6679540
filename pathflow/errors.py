"""Errors a user can fix: the CLI prints their message, no traceback, and exits non-zero."""


class PathflowError(Exception):
    """A problem with the user's input or environment; the message says what to do."""


class _QuietUserErrors:
    """Logging filter: a PathflowError is the user's to fix, so its log record carries the
    message without a traceback (Prefect logs task/flow failures with exc_info)."""

    def filter(self, record) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, PathflowError):
            record.exc_info, record.exc_text = None, None
        return True


def quiet_user_errors(loggers=("prefect.task_runs", "prefect.flow_runs")) -> None:
    """Install the filter on Prefect's run loggers (idempotent)."""
    import logging

    for name in loggers:
        lg = logging.getLogger(name)
        if not any(isinstance(f, _QuietUserErrors) for f in lg.filters):
            lg.addFilter(_QuietUserErrors())
