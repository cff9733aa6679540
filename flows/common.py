"""What the flows share."""

from __future__ import annotations

from pathflow.errors import PathflowError


def result_of(state) -> dict:
    """A flow run's return value, or PathflowError with why it failed."""
    if not state.is_completed():
        try:
            state.result()
        except PathflowError:
            raise
        except Exception as e:
            raise PathflowError(f"flow run {state.name}: {type(e).__name__}: {e}") from e
        raise PathflowError(f"flow run ended {state.name}: {state.message}")
    return state.result()
