"""Jobs and tasks that do nothing but prove the spine works: `noop` and a raw Celery ping."""

import time
from typing import Any

from tasks.app import app
from tasks.context import JobContext
from tasks.workflow import workflow


@workflow("noop")
def noop(ctx: JobContext) -> dict[str, Any]:
    """Walk through `steps` phases over `seconds`, checking for cancel between them."""
    seconds, steps = ctx.params.seconds, max(ctx.params.steps, 1)
    for step in range(steps):
        ctx.phase(f"step {step + 1}/{steps}", progress=100.0 * step / steps)
        time.sleep(seconds / steps)
    ctx.check_cancel()
    return {"steps": steps, "attempt": ctx.attempt}


@app.task(name="laxcluster.ping")
def ping(value: Any = None) -> Any:
    """A raw Celery round trip, the baseline the job benchmark compares against."""
    return value
