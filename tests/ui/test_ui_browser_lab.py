"""The web console in a real headless Chromium (Debian's `chromium`, driven by Playwright for Python with its
executable path; no browser download) against the API under gunicorn as `laxcluster run` serves it, with the
lab's workers: sign in, install a VM from the form (checked live) and watch its job reach 100 %, read its boot
line on the page's console, see its screen through noVNC, back it up and verify the backup, check and run a migration with the picker, delete it with its name typed; a viewer sees no buttons and a forged post is
refused. Each page's screenshot is kept under tests/ui/screenshots/."""

import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import websocket
from playwright.sync_api import Browser, Page, expect, sync_playwright

from models.db import transaction
from models.protection import BackupStore
from tests.fixtures.vms import boot_line, server_uri, unique
from tests.support import need_binary

pytestmark = [pytest.mark.integration, pytest.mark.lab]
SCREENSHOTS = Path(__file__).parent / "screenshots"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Headless, and quiet on a closed network: no background connections, no updates, no sync.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
JOB_DEADLINE_MS = 300_000


@pytest.fixture
def browser() -> Iterator[Browser]:
    need_binary("chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def shot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(exist_ok=True)
    page.screenshot(path=SCREENSHOTS / f"{name}.png", full_page=True)


def sign_in(browser: Browser, url: str, token: str) -> Page:
    page = browser.new_page(viewport={"width": 1366, "height": 800})
    page.goto(f"{url}/ui/")
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    shot(page, "signin")
    page.get_by_label("API token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name=re.compile("^Active machines"))).to_be_visible()
    return page


def job_succeeds(page: Page) -> None:
    """On a job's page: wait until it is final; it must have succeeded at 100 %."""
    expect(page.locator("#job-state")).to_have_text(re.compile("succeeded|failed|cancelled"), timeout=JOB_DEADLINE_MS)
    assert page.locator("#job-state").inner_text() == "succeeded", page.locator("#job").inner_text()
    expect(page.locator("#job-percent")).to_have_text("100 %")
    expect(page.locator("#job-progress")).to_have_attribute("value", "100.0")


def assert_console_shows_boot_line(page: Page, name: str) -> None:
    """Ask the guest's shell for its boot line through the page's terminal until it shows (within a deadline)."""
    expect(page.locator("#console-status")).to_have_text("connected")
    page.locator("#terminal").click()
    deadline = time.monotonic() + 120
    while True:
        page.keyboard.type("cat /etc/laxcluster-boot\n")
        try:
            expect(page.locator(".xterm-rows")).to_contain_text(f"LAXCLUSTER-BOOT hostname={name}", timeout=3000)
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise


def test_an_operator_installs_backs_up_migrates_and_deletes_a_vm_in_the_browser(cluster, served_api, tokens, browser,
                                                                                  tmp_path):
    with transaction(cluster.sessions) as session:
        session.add(BackupStore(name="local", kind="local", location=str(tmp_path / "store")))
    name = unique("web")
    page = sign_in(browser, served_api.url, tokens["operator"])

    page.get_by_role("link", name="Install a machine").click()
    page.get_by_label("Name").fill(name)
    page.get_by_label("Template").select_option("tiny")
    page.locator("select[name=server]").select_option("cs1")
    expect(page.locator("#install-check")).to_contain_text(f"Ready: {name} from tiny")
    page.get_by_label("Memory").fill("lots")
    expect(page.locator("#install-check")).to_contain_text("InvalidInput")
    page.get_by_label("Memory").fill("256M")
    expect(page.locator("#install-check")).to_contain_text("Ready:")
    shot(page, "install")
    page.get_by_role("button", name="Install").click()
    job_succeeds(page)
    shot(page, "install-job")
    assert boot_line(server_uri(cluster, "cs1"), name)[0] == name

    page.get_by_role("link", name=f"Machine {name}").click()
    expect(page.get_by_role("heading", name=name)).to_contain_text("running")
    shot(page, "vm")
    page.get_by_role("link", name="Console").click()
    assert_console_shows_boot_line(page, name)
    shot(page, "console")
    page.go_back()
    page.get_by_role("link", name="Screen").click()
    expect(page.locator("#screen-status")).to_have_text("connected", timeout=30_000)
    assert page.locator("#screen canvas").evaluate("canvas => canvas.width * canvas.height") > 0
    shot(page, "screen")
    page.go_back()
    page.get_by_role("button", name="Back up now").click()
    job_succeeds(page)
    page.get_by_role("link", name="Backups").click()
    backup = page.locator("tr[data-backup]").filter(has_text=name).filter(has_text="vm-")
    expect(backup.first).to_contain_text("full")
    shot(page, "backups")
    backup.first.get_by_role("button", name="Verify").click()
    job_succeeds(page)

    page.goto(f"{served_api.url}/ui/vms/{name}")
    page.get_by_label("Migrate to").select_option("cs2")
    page.get_by_role("button", name="Check first").click()
    job_succeeds(page)
    expect(page.locator(".result")).to_contain_text('"problems": []')
    shot(page, "migrate-check")
    page.get_by_role("button", name=f"Migrate {name} to cs2 now").click()
    job_succeeds(page)
    page.goto(f"{served_api.url}/ui/")
    row = page.locator(f"tr[data-vm='{name}']")
    expect(row).to_contain_text("cs2")
    # Its display moved with it: on cs2's address, behind the same password.
    page.goto(f"{served_api.url}/ui/vms/{name}/screen")
    expect(page.locator("#screen-status")).to_have_text("connected", timeout=30_000)
    page.goto(f"{served_api.url}/ui/")
    shot(page, "overview")
    page.get_by_placeholder("Filter machines").fill(name)
    expect(page.locator("table.vm-table tr[data-vm]:visible")).to_have_count(1)

    page.goto(f"{served_api.url}/ui/vms/{name}")
    page.get_by_label("to delete it").fill(name)
    page.get_by_role("button", name="Delete").click()
    job_succeeds(page)
    page.goto(f"{served_api.url}/ui/jobs")
    shot(page, "jobs")
    page.goto(f"{served_api.url}/ui/")
    expect(page.locator(f"tr[data-vm='{name}']")).to_have_count(0)


def test_a_viewer_sees_no_buttons_and_a_forged_post_is_refused(cluster, served_api, tokens, browser):
    name = unique("view")
    operator = sign_in(browser, served_api.url, tokens["operator"])
    operator.goto(f"{served_api.url}/ui/install")
    operator.get_by_label("Name").fill(name)
    operator.get_by_label("Template").select_option("tiny")
    operator.get_by_role("button", name="Install").click()
    job_succeeds(operator)

    viewer = sign_in(browser, served_api.url, tokens["viewer"])
    viewer.goto(f"{served_api.url}/ui/vms/{name}")
    expect(viewer.get_by_role("heading", name=name)).to_be_visible()
    expect(viewer.get_by_role("button")).to_have_text(["Sign out"])
    shot(viewer, "vm-viewer")
    # A post without the session's CSRF token, with the operator's own cookie: refused, nothing happens.
    forged = operator.request.post(f"{served_api.url}/ui/vms/{name}/actions/destroy", form={"action": "destroy"},
                                   max_redirects=0)
    assert forged.status == 403 and "CSRF" in forged.text()
    # The console's websocket with the operator's cookie, opened from another site: refused before the upgrade.
    cookie = "; ".join(f"{c['name']}={c['value']}" for c in operator.context.cookies())
    for console in ("console", "screen"):
        with pytest.raises(websocket.WebSocketBadStatusException) as refused:
            websocket.create_connection(f"{served_api.url.replace('http', 'ws', 1)}/ui/vms/{name}/{console}/socket",
                                        header=[f"Cookie: {cookie}"], origin="http://evil.example", timeout=10)
        assert refused.value.status_code == 403
    viewer.goto(f"{served_api.url}/ui/vms/{name}/console")
    expect(viewer.locator(".problem")).to_contain_text("Forbidden")
    operator.goto(f"{served_api.url}/ui/vms/{name}")
    expect(operator.get_by_role("heading", name=name)).to_contain_text("running")
    operator.get_by_label("to delete it").fill(name)
    operator.get_by_role("button", name="Delete").click()
    job_succeeds(operator)
