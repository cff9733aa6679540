"""What the flows share."""

from __future__ import annotations

from pathflow.errors import PathflowError
from storage.store import new_run_id


def auto_run_id() -> str:
    """A run id for a run started without one (a deployment run): date + the flow run's id."""
    from prefect.runtime import flow_run

    return new_run_id().rsplit("-", 1)[0] + "-" + str(flow_run.id)[:8]


def run_name(prefix: str):
    """A flow_run_name callable: ``<prefix>-<run_id parameter>``, else the flow run's short id."""

    def name() -> str:
        from prefect.runtime import flow_run

        p = flow_run.parameters
        return f"{prefix}-{p.get('run_id') or str(flow_run.id)[:8]}"

    return name


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


def current_flow_run_id() -> str | None:
    """The Prefect flow run this code runs in (its page in the UI), or None outside one."""
    from prefect.runtime import flow_run

    fid = flow_run.get_id()
    return str(fid) if fid else None
