"""The dashboard in a real browser: headless Chromium (Debian's ``chromium``) driven by
Playwright, against a real server and a real worker running real runs in this test's Trio run.

The browser runs in one worker thread (Playwright's sync API); the test's Trio run keeps
serving meanwhile, and the browser script reaches back into it with ``trio.from_thread.run``
(to submit runs while a page is open). Screenshots go to a temporary folder (or
``$TRIOWORKER_SCREENSHOTS``); their paths are listed at the end of the test run.

These tests skip, with the reason, only when Playwright or Chromium is missing outside CI;
with ``CI`` or ``TRIOWORKER_REQUIRE_BROWSER=1`` set, a missing browser fails them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import httpx
import pytest
import trio

from trioworker.server import RunningServer, ServerConfig
from trioworker.tasks import task
from trioworker.testing import ServerControl
from trioworker.worker.task_worker import TaskWorker

from .conftest import SCREENSHOTS
from .helpers import submit, wait_all

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

#: Debian's Chromium; never a browser Playwright downloads.
CHROMIUM = os.environ.get("TRIOWORKER_CHROMIUM", "/usr/bin/chromium")
#: Seconds a page may take to show what the test waits for.
WAIT_MS = 15_000


def _missing_browser() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright is not installed (pip install -e '.[test]')"
    if not Path(CHROMIUM).is_file():
        return f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    return None


@pytest.fixture
def browser_ready() -> None:
    missing = _missing_browser()
    if missing is None:
        return
    if os.environ.get("CI") or os.environ.get("TRIOWORKER_REQUIRE_BROWSER") == "1":
        pytest.fail(f"the browser tests must run here: {missing}")
    pytest.skip(missing)


Shoot = Callable[["Page", str], Path]


@pytest.fixture
def shoot(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Shoot:
    """``shoot(page, name)`` saves a full-page screenshot and lists it for the summary."""
    env = os.environ.get("TRIOWORKER_SCREENSHOTS")
    folder = Path(env) if env else tmp_path_factory.getbasetemp() / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    shots = request.config.stash.setdefault(SCREENSHOTS, [])

    def take(page: Page, name: str) -> Path:
        path = folder / f"{request.node.name}-{name}.png"
        page.screenshot(path=str(path), full_page=True)
        shots.append(str(path))
        return path

    return take


async def in_browser(script: Callable[[Browser], None]) -> None:
    """Run ``script`` with a headless Chromium, in a worker thread, to its end."""

    def run() -> None:
        from playwright.sync_api import expect, sync_playwright

        expect.set_options(timeout=WAIT_MS)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM)
            try:
                script(browser)
            finally:
                browser.close()

    await trio.to_thread.run_sync(run)


def open_page(browser: Browser, url: str, width: int = 1280, height: int = 900) -> tuple[Page, list[str]]:
    """A page at ``url``, and the errors its scripts raise or log (the test checks none came)."""
    page = browser.new_page(viewport={"width": width, "height": height})
    page.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.goto(url)
    return page, errors


def tasks_for_a_demo(started: trio.Event, stopped: trio.Event) -> list[Any]:
    """The tasks the click-through needs: a sum, a failure, a run that holds until it is
    cancelled (``started`` when it runs, ``stopped`` when it was cancelled), and a parent
    that submits two children."""

    @task(key="dash.add")
    def add(a: int, b: int) -> int:
        return a + b

    @task(key="dash.fail")
    def fail(x: int) -> int:
        raise ValueError(f"no good: {x}")

    @task(key="dash.hold")
    async def hold() -> None:
        started.set()
        try:
            await trio.sleep_forever()
        finally:
            stopped.set()

    @task(key="dash.parent")
    async def parent(n: int) -> int:
        children = [await add.delay(n, i) for i in range(2)]
        return sum([await child.result() for child in children])

    return [add, fail, hold, parent]


@attrs.frozen
class Demo:
    """A real server, an API client for it, and the demo's tasks for a real worker."""

    server: RunningServer
    api: httpx.AsyncClient
    #: The ``dash.hold`` run is running; it was stopped.
    started: trio.Event
    stopped: trio.Event
    make_worker: Callable[..., TaskWorker]

    def worker(self, **options: Any) -> TaskWorker:
        """A worker of the demo's tasks (``async with`` it)."""
        return self.make_worker(*tasks_for_a_demo(self.started, self.stopped), **options)


@pytest.fixture
def demo(
    browser_ready: None,
    trioworker_server: RunningServer,
    api: httpx.AsyncClient,
    trioworker_worker: Callable[..., TaskWorker],
) -> Demo:
    return Demo(trioworker_server, api, trio.Event(), trio.Event(), trioworker_worker)


async def test_overview_filter_run_page_cancel_retry_and_delete(demo: Demo, shoot: Shoot) -> None:
    server, api, started, stopped = demo.server, demo.api, demo.started, demo.stopped
    async with demo.worker(limit=8, client_id="dash-worker-1") as w:
        adds = await submit(api, "dash.add", *({"a": i, "b": 1} for i in range(5)))
        [failed] = await submit(api, "dash.fail", {"x": 7})
        [parent] = await submit(api, "dash.parent", {"n": 10})
        [held] = await submit(api, "dash.hold", {})
        await wait_all(api, [*adds, failed, parent])
        await started.wait()
        newest = [run["id"] for run in (await api.get("/task_runs?sort=CREATED_DESC")).json()]
        assert len(newest) == 10 and newest[-1] == adds[0]
        assert w.client_id == "dash-worker-1"

        def script(browser: Browser) -> None:
            from playwright.sync_api import expect

            page, errors = open_page(browser, server.url + "/")
            # Overview: counts by key and state, the worker, the chart.
            add_row = page.locator('#task-keys tr[data-task-key="dash.add"]')
            expect(add_row.locator("a.count.c-COMPLETED")).to_have_text("7")  # 5 + 2 children
            expect(page.locator('#task-keys tr[data-task-key="dash.hold"] a.count.c-RUNNING')).to_have_text(
                "1"
            )
            expect(page.locator('#task-keys tr[data-task-key="dash.fail"] a.count.c-FAILED')).to_have_text(
                "1"
            )
            worker = page.locator('#workers tr[data-client-id="dash-worker-1"]')
            expect(worker).to_contain_text("dash.hold")
            expect(worker.locator("td").nth(2)).to_have_text("8")
            expect(page.locator("#chart svg rect.bar-COMPLETED")).not_to_have_count(0)
            expect(page.locator("#live")).to_have_attribute("data-state", "live")
            shoot(page, "overview")

            # Runs: newest first, then filtered by key and state.
            page.get_by_role("link", name="Runs", exact=True).click()
            rows = page.locator("#runs-table tbody tr")
            expect(rows).to_have_count(10)
            expect(rows.first).to_have_attribute("data-run-id", newest[0])
            expect(rows.last).to_have_attribute("data-run-id", newest[-1])
            page.select_option("#filter-key", "dash.add")
            expect(rows).to_have_count(7)
            page.select_option("#filter-state", "RUNNING")
            expect(page.locator("#runs-body")).to_contain_text("No run matches these filters.")
            page.select_option("#filter-key", "dash.hold")
            expect(rows).to_have_count(1)
            expect(rows.first.locator(".badge")).to_have_text("Running")
            assert re.search(r"task_key=dash\.hold", page.url) and "state=RUNNING" in page.url
            shoot(page, "runs-filtered")

            # The held run's page, and cancel: the worker stops it, the page shows it live.
            rows.first.locator("td:nth-child(2) a").click()
            expect(page.locator("#run-id")).to_have_text(held)
            expect(page.locator("#history tbody tr")).to_have_count(3)  # scheduled, pending, running
            # Delete, then back out: while "Confirm delete" waits, cancel is out of reach and
            # "Keep" leaves the run as it was.
            expect(page.locator("#keep-run")).to_be_hidden()
            page.locator("#delete-run").click()
            expect(page.locator("#delete-run")).to_have_text("Confirm delete")
            expect(page.locator("#cancel-run")).to_be_hidden()
            page.locator("#keep-run").click()
            expect(page.locator("#delete-run")).to_have_text("Delete")
            expect(page.locator("#keep-run")).to_be_hidden()
            expect(page.locator("#run-name .badge")).to_have_text("Running")
            page.locator("#cancel-run").click()
            expect(page.locator("#run-name .badge")).to_have_text("Cancelled")
            expect(page.locator("#cancel-run")).to_have_count(0)
            expect(page.locator("#retry-run")).to_be_visible()
            shoot(page, "run-cancelled")

            # The parent run lists its children; a child links back to it.
            page.goto(f"{server.url}/#/runs/{parent}")
            children = page.locator("#children tbody tr")
            expect(children).to_have_count(2)
            expect(page.locator("#result pre")).to_have_text("21")
            children.first.locator("td:nth-child(2) a").click()
            expect(page.locator("#parent-run")).to_have_text(parent[:8])
            shoot(page, "child")

            # The failed run: its traceback; retry makes a new run that fails too; delete.
            page.goto(f"{server.url}/#/runs?state=FAILED")
            expect(rows).to_have_count(1)
            rows.first.locator("td:nth-child(2) a").click()
            expect(page.locator("#error")).to_contain_text("ValueError: no good: 7")
            expect(page.locator("#error pre")).to_contain_text("Traceback")
            expect(page.locator("#parameters pre")).to_contain_text('"x": 7')
            shoot(page, "run-failed")
            page.locator("#retry-run").click()
            expect(page.locator("#run-id")).not_to_have_text(failed)
            expect(page.locator("#run-name .badge")).to_have_text("Failed")  # it ran again, live
            page.locator("#delete-run").click()
            expect(page.locator("#delete-run")).to_have_text("Confirm delete")
            expect(page.locator("#retry-run")).to_be_hidden()
            expect(page.locator("#keep-run")).to_be_visible()
            page.locator("#delete-run").click()
            expect(page.locator(".toast", has_text="Deleted.")).to_be_visible()
            expect(rows).to_have_count(1)  # back on dash.fail's runs: the first failure only
            expect(rows.first).to_have_attribute("data-run-id", failed)
            assert errors == []

        await in_browser(script)
        with trio.fail_after(10):
            await stopped.wait()  # the worker really stopped the cancelled run
    run = (await api.get(f"/task_runs/{held}")).json()
    assert run["state"]["type"] == "CANCELLED"
    assert [r["state"]["type"] for r in (await api.get("/task_runs?task_key=dash.fail")).json()] == ["FAILED"]


async def test_changes_appear_without_a_reload_and_the_page_does_not_poll(demo: Demo, shoot: Shoot) -> None:
    server, api = demo.server, demo.api
    async with demo.worker(limit=20):

        async def twenty_runs() -> None:
            await wait_all(api, await submit(api, "dash.add", *({"a": i, "b": i} for i in range(20))))

        def script(browser: Browser) -> None:
            from playwright.sync_api import expect

            page, errors = open_page(browser, server.url + "/")
            expect(page.locator("#live")).to_have_attribute("data-state", "live")
            expect(page.locator("#workers tbody tr")).to_have_count(1)
            requests: list[str] = []
            page.on("request", lambda request: requests.append(request.url))
            trio.from_thread.run(twenty_runs)
            add_row = page.locator('#task-keys tr[data-task-key="dash.add"]')
            expect(add_row.locator("a.count.c-COMPLETED")).to_have_text("20")
            expect(page.locator("#stats")).to_contain_text("20Completed · last hour")
            assert requests == []  # pushed over the feed: not one request
            shoot(page, "overview-live")

            page.get_by_role("link", name="Runs", exact=True).click()
            expect(page.locator("#runs-table tbody tr")).to_have_count(20)
            expect(page.locator("#page-range")).to_have_text("1\N{EN DASH}20 of 20")
            trio.from_thread.run(twenty_runs)
            expect(page.locator("#runs-table tbody tr")).to_have_count(40)
            expect(page.locator("#page-range")).to_have_text("1\N{EN DASH}40 of 40")

            # Schedules: one added elsewhere shows with its next run; each tick's run shows too.
            page.get_by_role("link", name="Overview", exact=True).click()
            expect(page.locator("#schedules")).to_contain_text("No schedule")
            trio.from_thread.run(schedule, {"name": "every-hour", "interval": 3600})
            hourly = page.locator('#schedules tr[data-schedule="every-hour"]')
            expect(hourly).to_contain_text("every 1 h 0 min")
            expect(hourly.locator(".next-fire time")).to_have_text(re.compile(r"^in \d+ (min|s)"))
            trio.from_thread.run(
                schedule, {"name": "each-second", "interval": 1, "parameters": {"a": 1, "b": 2}}
            )
            ticking = page.locator('#schedules tr[data-schedule="each-second"]')
            expect(ticking.locator("td").nth(4).locator("a")).to_have_count(1)  # the last tick's run
            shoot(page, "overview-schedules")
            trio.from_thread.run(unschedule, "each-second")
            expect(ticking).to_have_count(0)
            expect(hourly).to_have_count(1)
            assert errors == []

        async def schedule(fields: dict[str, Any]) -> None:
            body = {"task_key": "dash.add", "parameters": {"a": 0, "b": 0}, **fields}
            (await api.post("/schedules", json=body)).raise_for_status()

        async def unschedule(name: str) -> None:
            (await api.delete(f"/schedules/{name}")).raise_for_status()

        await in_browser(script)


async def test_the_runs_list_loads_once_and_without_parameters_or_results(demo: Demo) -> None:
    server, api = demo.server, demo.api
    [first] = await submit(api, "dash.add", {"a": 1, "b": 2})

    def script(browser: Browser) -> None:
        from playwright.sync_api import expect

        page = browser.new_page()
        page.set_default_timeout(WAIT_MS)
        lists: list[str] = []
        page.on("request", lambda r: lists.append(r.url) if "/api/task_runs?" in r.url else None)
        page.goto(server.url + "/#/runs")
        expect(page.locator("#live")).to_have_attribute("data-state", "live")
        expect(page.locator("#runs-table tbody tr")).to_have_count(1)
        trio.from_thread.run(submit, api, "dash.add", {"a": 3, "b": 4})
        expect(page.locator("#runs-table tbody tr")).to_have_count(2)
        # One request at page load (not a second when the feed connects), one for the new run.
        assert len(lists) == 2, lists
        assert all("fields=summary" in url for url in lists), lists
        page.goto(f"{server.url}/#/runs/{first}")
        expect(page.locator("#parameters")).to_contain_text('"a": 1')
        assert "fields=summary" in lists[-1] and f"parent_task_run_id={first}" in lists[-1], lists

    await in_browser(script)


async def test_a_run_page_counts_the_deliveries_of_every_attempt(demo: Demo) -> None:
    server, api = demo.server, demo.api

    @task(key="dash.flaky", retries=2)
    def flaky() -> None:
        raise RuntimeError("again")

    async with demo.make_worker(flaky):
        [run_id] = await submit(api, "dash.flaky", {})
        [run] = await wait_all(api, [run_id])
    assert run["state"]["type"] == "FAILED" and run["run_count"] == 3
    assert run["delivery_count"] == 1  # the crash guard's count: this attempt's only

    def script(browser: Browser) -> None:
        from playwright.sync_api import expect

        page, errors = open_page(browser, f"{server.url}/#/runs/{run_id}")
        expect(page.locator("#deliveries")).to_have_text("3")
        expect(page.locator("#deliveries + .sub")).to_have_text("1 in this attempt")
        assert errors == []

    await in_browser(script)


async def test_a_run_page_shows_its_name_tags_cache_key_and_the_run_it_waits_for(demo: Demo) -> None:
    server, api = demo.server, demo.api
    keyed = {"cache_key": "report-ann", "tags": ["nightly"]}
    [first, second] = await submit(api, "dash.cached", {}, {}, name="report of ann", **keyed)

    def script(browser: Browser) -> None:
        from playwright.sync_api import expect

        page, errors = open_page(browser, f"{server.url}/#/runs/{second}")
        expect(page.locator("#run-name")).to_contain_text("report of ann")
        expect(page.locator(".facts")).to_contain_text("nightly")
        expect(page.locator(".facts")).to_contain_text("report-ann")
        expect(page.locator("#cache-owner")).to_have_text(first[:8])
        page.locator("#cache-owner").click()
        expect(page).to_have_url(re.compile(f"#/runs/{first}$"))
        assert errors == []

    await in_browser(script)


async def test_a_run_page_reaches_every_child_past_the_first_two_hundred(demo: Demo) -> None:
    server, api = demo.server, demo.api
    [parent] = await submit(api, "dash.parent", {"n": 1})
    adds = ({"a": i, "b": 0} for i in range(210))
    children = await submit(api, "dash.add", *adds, parent_task_run_id=parent)

    def script(browser: Browser) -> None:
        from playwright.sync_api import expect

        page, errors = open_page(browser, f"{server.url}/#/runs/{parent}")
        rows = page.locator("#children tbody tr")
        expect(rows).to_have_count(200)
        expect(page.locator("#children-summary")).to_contain_text("the first 200 child runs of more, below")
        page.locator("#more-children").click()
        expect(rows).to_have_count(210)
        expect(rows.last).to_have_attribute("data-run-id", children[-1])
        expect(page.locator("#children-count")).to_have_text("210 child runs, submitted from inside this run")
        expect(page.locator("#more-children")).to_have_count(0)
        assert errors == []

    await in_browser(script)


async def test_a_run_page_shows_its_run_group_and_that_it_is_detached(demo: Demo) -> None:
    server, api = demo.server, demo.api
    group = "7d1e5a90-2c4b-4f1e-8a3d-5b6c7d8e9f01"
    [grouped] = await submit(api, "dash.add", {"a": 1, "b": 2}, group_id=group)
    [detached] = await submit(api, "dash.add", {"a": 1, "b": 2}, detached=True)

    def script(browser: Browser) -> None:
        from playwright.sync_api import expect

        page, errors = open_page(browser, f"{server.url}/#/runs/{grouped}")
        expect(page.locator("#run-group")).to_have_text(group)
        expect(page.get_by_text("cancelling its parent leaves it running")).to_have_count(0)
        page.goto(f"{server.url}/#/runs/{detached}")
        expect(page.get_by_text("cancelling its parent leaves it running")).to_be_visible()
        expect(page.locator("#run-group")).to_have_count(0)
        assert errors == []

    await in_browser(script)


#: The API key of the tests that set one.
KEY = "open-sesame"


def keyed_client(server: RunningServer) -> httpx.AsyncClient:
    """An API client that sends :data:`KEY`."""
    return httpx.AsyncClient(base_url=server.api_url, headers={"Authorization": f"Bearer {KEY}"})


async def test_with_an_api_key_the_page_asks_for_it_and_shows_nothing_without_it(
    browser_ready: None, trioworker_server_control: ServerControl, shoot: Shoot
) -> None:
    server = await trioworker_server_control.start(api_key=KEY)
    async with keyed_client(server) as api:
        await submit(api, "dash.secret", {"card": "4111"})

    def script(browser: Browser) -> None:
        from playwright.sync_api import expect

        page, errors = open_page(browser, server.url + "/")
        expect(page.locator("#login")).to_be_visible()
        expect(page.locator("#view")).to_be_empty()
        expect(page.locator("#live")).to_have_attribute("data-state", "offline")
        shoot(page, "login")
        page.fill("#api-key", "wrong")
        page.get_by_role("button", name="Show the dashboard").click()
        expect(page.locator("#login-error")).to_have_text("That key was refused.")
        expect(page.locator("body")).not_to_contain_text("dash.secret")
        page.fill("#api-key", KEY)
        page.get_by_role("button", name="Show the dashboard").click()
        expect(page.locator('#task-keys tr[data-task-key="dash.secret"]')).to_be_visible()
        expect(page.locator("#live")).to_have_attribute("data-state", "live")
        page.reload()  # the key stays for this tab
        expect(page.locator('#task-keys tr[data-task-key="dash.secret"]')).to_be_visible()
        page.get_by_role("button", name="Forget key").click()
        expect(page.locator("#login")).to_be_visible()
        expect(page.locator("body")).not_to_contain_text("dash.secret")
        # The browser logs each refused request; nothing else went wrong.
        assert [e for e in errors if "status of 401" not in e] == []

    await in_browser(script)


@task(key="dash.nap")
async def nap() -> None:
    await trio.lowlevel.checkpoint()


async def test_several_servers_on_one_database_are_listed_with_the_workers_of_each(
    browser_ready: None, postgres_url: str, shoot: Shoot
) -> None:
    async with trio.open_nursery() as nursery:
        config = ServerConfig(
            db_path=postgres_url, port=0, replica_timeout=10.0
        )  # the browser is slow to start
        a = await ServerControl(nursery, config).start()
        b = await ServerControl(nursery, config).start()
        a_id, b_id = str(a.service.server_id), str(b.service.server_id)
        async with (
            TaskWorker(nap, api_url=a.api_url, client_id="dash-on-a", shutdown_grace_seconds=1),
            TaskWorker(nap, api_url=b.api_url, client_id="dash-on-b", shutdown_grace_seconds=1),
        ):

            def script(browser: Browser) -> None:
                from playwright.sync_api import expect

                page, errors = open_page(browser, a.url + "/")
                servers = page.locator("#servers tbody tr")
                expect(servers).to_have_count(2)
                expect(servers.first).to_have_attribute("data-server-id", a_id)  # the one that answers
                expect(servers.first).to_contain_text("this one")
                expect(servers.first).to_contain_text(a.url)
                expect(servers.last).to_contain_text(b_id[:8])
                expect(servers.last).to_contain_text(b.url)
                expect(servers.last).not_to_contain_text("this one")
                expect(servers.last.locator("td").nth(5)).to_have_text("1")  # its worker
                # Each worker with the server it is connected to (b's heard of through the database).
                on_a = page.locator('#workers tr[data-client-id="dash-on-a"]')
                on_b = page.locator('#workers tr[data-client-id="dash-on-b"]')
                expect(on_a.locator("td.server")).to_have_text(a_id[:8])
                expect(on_b.locator("td.server")).to_have_text(b_id[:8])
                expect(page.locator("#workers th", has_text="Server")).to_have_count(1)
                expect(page.locator('#task-keys tr[data-task-key="dash.nap"] td').nth(9)).to_have_text("2")
                shoot(page, "two-servers")
                assert errors == []

            await in_browser(script)
        nursery.cancel_scope.cancel()


async def test_a_narrow_window_has_no_page_wide_scrolling(demo: Demo, shoot: Shoot) -> None:
    server, api = demo.server, demo.api
    async with demo.worker():
        [failed] = await submit(api, "dash.fail", {"x": 1})
        await wait_all(api, [failed])

        def script(browser: Browser) -> None:
            from playwright.sync_api import expect

            page, errors = open_page(browser, server.url + "/", width=390, height=844)
            for view, ready in (
                ("#/", "#task-keys"),
                ("#/runs", "#runs-table"),
                (f"#/runs/{failed}", "#error"),
            ):
                page.goto(f"{server.url}/{view}")
                expect(page.locator(ready)).to_be_visible()
                wide = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
                assert wide <= 0, f"{view} is {wide} px wider than the window"
                shoot(page, f"narrow-{ready.strip('#')}")
            assert errors == []

        await in_browser(script)


async def test_the_api_page_shows_every_operation_of_the_document_after_asking_for_the_key(
    browser_ready: None, trioworker_server_control: ServerControl, shoot: Shoot
) -> None:
    server = await trioworker_server_control.start(api_key=KEY)
    async with keyed_client(server) as api:
        document = (await api.get("/openapi.json")).json()
    operations = [(path, method) for path, item in document["paths"].items() for method in item]

    def script(browser: Browser) -> None:
        from playwright.sync_api import expect

        page, errors = open_page(browser, server.url + "/api/docs")
        expect(page.locator("#login")).to_be_visible()
        page.fill("#api-key", KEY)
        page.get_by_role("button", name="Show the API").click()
        ops = page.locator("#docs details.op[data-path]")
        expect(ops).to_have_count(len(operations))
        create = page.locator('details.op[data-path="/api/task_runs"][data-method="post"]')
        create.locator("summary").click()
        expect(create).to_contain_text("task_key")
        expect(create.locator("pre.json")).to_contain_text('"task_key": "app.say"')
        expect(create).to_contain_text("409")
        shoot(page, "create-run")
        create.get_by_role("link", name="TaskRunCreate").first.click()
        expect(page.locator("#schema-TaskRunCreate")).to_have_attribute("open", "")
        expect(page.locator("#schema-TaskRunCreate")).to_contain_text("idempotency_key")
        socket = page.locator('details.op[data-path="/api/events"]')
        expect(socket.locator(".method")).to_have_text("WS")
        page.reload()  # the key stays for this tab
        expect(ops).to_have_count(len(operations))
        assert [e for e in errors if "status of 401" not in e] == []

    await in_browser(script)
