"""What an operator sees of a job outside the API: the logs of the API (under gunicorn) and of a real worker,
one JSON object per line, tell its whole story by its id; Flower's task list names its kind and target."""

import json
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import requests

from lab.processes import free_port, wait_until
from tasks.queues import CONTROL
from tests.fixtures.http import bearer
from tests.support import REPO

pytestmark = pytest.mark.integration


def json_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of the log, parsed (a line that is not one JSON object fails the test)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def finished(url: str, token: str, job_id: str) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        job = requests.get(f"{url}/jobs/{job_id}", headers=bearer(token), timeout=10).json()
        return job if job["state"] in ("succeeded", "failed", "cancelled") else None

    return wait_until(ended, 60, f"job {job_id} to end", interval=0.2)


def test_a_jobs_id_greps_its_whole_story_out_of_the_api_and_worker_logs(served_api, celery_worker, tokens):
    worker = celery_worker([CONTROL])
    target = f"logs-{secrets.token_hex(4)}"
    job = requests.post(f"{served_api.url}/jobs/noop", json={"target": target, "steps": 2},
                        headers=bearer(tokens["admin"]), timeout=10).json()
    assert finished(served_api.url, tokens["viewer"], job["id"])["state"] == "succeeded"

    api, ran = json_lines(served_api.log), json_lines(worker.log)
    story = [line for line in api + ran if job["id"] in json.dumps(line)]
    assert job["target"].endswith(target)
    assert story and all((line["job_id"], line["kind"], line["target"]) == (job["id"], "noop", job["target"])
                         for line in story if "job_id" in line)
    told = [line["message"] for line in story]
    assert "submitted by test-admin" in told and f"sent to {CONTROL}" in told
    assert [m.split(" on ")[0] for m in told if m.startswith(("attempt", "phase"))] == [
        "attempt 0 started", "phase step 1/2", "phase step 2/2", "attempt 0 ended: succeeded"]
    assert any("POST /jobs/noop" in line["message"] for line in api), "no access line for the request"
    assert any(line["message"].endswith(" ready.") for line in ran)


@pytest.fixture
def flower(lax_env: dict[str, str], tmp_path: Path):
    """Flower on a free port behind basic auth, as `laxcluster run` starts it; stopped by PID."""
    port, password = free_port(), secrets.token_hex(8)
    log = tmp_path / "flower.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "tasks.app", "flower", "--address=127.0.0.1",
                                 f"--port={port}", f"--basic-auth=admin:{password}"], cwd=REPO,
                                env={**os.environ, **lax_env}, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    session = requests.Session()
    session.auth = ("admin", password)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _answers(proc, session, url, log), 60, "Flower to answer")
        yield session, url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _answers(proc: subprocess.Popen, session: requests.Session, url: str, log: Path) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"flower exited {proc.returncode}: {log.read_text()[-2000:]}")
    try:
        return session.get(f"{url}/api/workers", timeout=5).ok
    except requests.ConnectionError:
        return False


def test_flower_lists_a_job_by_its_kind_with_its_target(client, celery_worker, tokens, flower):
    session, url = flower
    worker = celery_worker([CONTROL])
    # Flower sees only the events sent after it listens: wait until it knows the worker.
    wait_until(lambda: any(name.startswith("test") for name in session.get(f"{url}/api/workers?refresh=1", timeout=30).json()),
               60, "Flower to see the worker")
    target = f"flower-{secrets.token_hex(4)}"
    job = client.post("/jobs/noop", json={"target": target}, headers=bearer(tokens["admin"])).get_json()
    task_id = job["celery_task_id"]
    assert task_id == f"{job['id']}-{job['attempt']}"

    def listed() -> dict[str, Any] | None:
        task = session.get(f"{url}/api/tasks", timeout=10).json().get(task_id)
        return task if task and task.get("state") == "SUCCESS" else None

    task = wait_until(listed, 60, f"Flower to list task {task_id} as done", interval=0.5)
    assert task["name"] == "laxcluster.job.noop"
    assert f"'target': '{job['target']}'" in task["kwargs"] and "'kind': 'noop'" in task["kwargs"]
    assert worker.proc.poll() is None
