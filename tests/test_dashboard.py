"""The dashboard in a real headless Chromium (Debian's ``chromium`` and ``chromium-driver``,
driven by Selenium) against a real ``hookline serve``: sign in with a key, find a job, watch its
events arrive live, replay a dead-lettered webhook and see it delivered at a local receiver,
manage an endpoint, and a tenant's key that cannot see another tenant's jobs while an admin key
sees them all. The screenshots it takes go to a temporary directory, or to ``docs/images`` with
``HOOKLINE_SCREENSHOTS=docs/images`` (how the ones in docs/dashboard.md are made)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from hookline.config import SinkConfig
from tests.conftest import REQUIRE_SERVICES, gateway_settings, serve, wait_for_status
from tests.processes import GatewayProcess, hookline, write_config
from tests.scripted_upstream import Reply, ScriptedUpstream, Status, Threaded
from tests.webhook_receiver import Answer, WebhookReceiver

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.remote.webelement import WebElement  # noqa: E402
from selenium.webdriver.support import expected_conditions  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
T = TypeVar("T")


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        if REQUIRE_SERVICES:
            pytest.fail(
                "chromium and chromium-driver are needed (apt-get install chromium chromium-driver)"
            )
        pytest.skip("chromium and chromium-driver are not installed")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-dev-shm-usage", "--window-size=1280,900",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    target = os.environ.get("HOOKLINE_SCREENSHOTS")
    path = Path(target) if target else tmp_path / "screenshots"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def threaded_upstream() -> Iterator[ScriptedUpstream]:
    with Threaded(ScriptedUpstream()) as upstream:
        yield upstream


@pytest.fixture
def threaded_receiver() -> Iterator[WebhookReceiver]:
    with Threaded(WebhookReceiver()) as receiver:
        yield receiver


def eventually(check: Callable[[], T | None], timeout: float = 20, what: str = "") -> T:
    """``check()``'s first true value, polled until ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            found = check()
        except StaleElementReferenceException:  # the page changed under the look: look again
            found = None
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        time.sleep(0.1)


def chat(model: str, text: str = "hello there", **extra: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": text}]
    return {"operation": "chat.completions", "model": model, "input": {"messages": messages},
            **extra}  # fmt: skip


class Site:
    """The served gateway, as a browser and as an API client see it."""

    def __init__(self, server: GatewayProcess, driver: WebDriver, shots: Path) -> None:
        self.server, self.driver, self.shots = server, driver, shots

    def open(self, path: str) -> None:
        self.driver.get(self.server.url + path)

    def click(self, element: WebElement) -> None:
        """Click something that loads another page, and wait for that page."""
        page = self.driver.find_element(By.TAG_NAME, "html")
        element.click()
        WebDriverWait(self.driver, 20).until(expected_conditions.staleness_of(page))

    def text(self) -> str:
        return str(self.driver.find_element(By.TAG_NAME, "body").text)

    def sign_in(self, key: str, *, valid: bool = True) -> None:
        """Fill in the sign-in form (the one on the page, if the page is it)."""
        if "/dashboard/login" not in self.driver.current_url:
            self.open("/dashboard/login")
        field = self.driver.find_element(By.ID, "key")
        field.clear()
        field.send_keys(key)
        self.click(self.driver.find_element(By.ID, "sign-in"))
        if valid:
            eventually(lambda: "/login" not in self.driver.current_url, what="signing in")

    def sign_out(self) -> None:
        self.click(
            self.driver.find_element(By.CSS_SELECTOR, "form[action='/dashboard/logout'] button")
        )
        eventually(lambda: "/dashboard/login" in self.driver.current_url, what="signing out")

    def shoot(self, name: str) -> None:
        self.driver.save_screenshot(str(self.shots / f"dashboard-{name}.png"))

    def api(self, key: str) -> httpx.Client:
        return httpx.Client(base_url=self.server.url, timeout=30,
                            headers={"Authorization": f"Bearer {key}"})  # fmt: skip


@pytest.fixture
def site(
    tmp_path: Path,
    browser: WebDriver,
    shots: Path,
    threaded_upstream: ScriptedUpstream,
    threaded_receiver: WebhookReceiver,
) -> Iterator[tuple[Site, dict[str, str]]]:
    config = write_config(tmp_path / "hookline.toml", threaded_upstream.base_url)
    config.write_text(config.read_text().replace(
        "[webhooks]\n", "[webhooks]\nretry_schedule_seconds = [0.1]\n"))  # fmt: skip
    env = {"HOOKLINE_CONFIG": str(config), "HOOKLINE_DATABASE_URL": f"sqlite:///{tmp_path}/h.db"}
    keys = {
        "acme": hookline("keys", "create", "--tenant", "acme", env=env).stdout.strip(),
        "globex": hookline("keys", "create", "--tenant", "globex", env=env).stdout.strip(),
        "admin": hookline("keys", "create", "--tenant", "ops", "--admin", env=env).stdout.strip(),
    }
    assert all(key.startswith("hk_") for key in keys.values()), keys
    server = GatewayProcess("serve", env, tmp_path)
    try:
        server.start()
        yield Site(server, browser, shots), keys
    finally:
        server.stop()


def test_the_dashboard_in_a_browser(
    site: tuple[Site, dict[str, str]],
    threaded_upstream: ScriptedUpstream,
    threaded_receiver: WebhookReceiver,
) -> None:
    web, keys = site
    driver = web.driver
    threaded_upstream.script("refused", Status(400, message="the model refused the request"))
    threaded_upstream.script("slow", Reply(text="one two three four five six seven eight",
                                           chunks=8, first_token_delay=1.5, token_delay=0.4))  # fmt: skip
    # The first two tries fail, which exhausts the schedule; the replay's try succeeds.
    threaded_receiver.script("/flaky", Answer(500, body="not now"), Answer(503), Answer(200))
    # The endpoint's test event fails twice (a dead letter), then its replay gets through.
    threaded_receiver.script("/endpoint", Answer(500), Answer(500), Answer(200))
    threaded_upstream.script("paced", Reply(first_token_delay=0.6))

    with web.api(keys["acme"]) as acme, web.api(keys["globex"]) as globex:
        done = [
            acme.post("/v1/jobs", json=chat("m", f"question {i}")).json()["id"] for i in range(4)
        ]
        refused = acme.post("/v1/jobs", json=chat("refused")).json()["id"]
        hooked = acme.post("/v1/jobs",
                           json=chat("m", webhook={"url": threaded_receiver.url("/flaky")})).json()["id"]  # fmt: skip
        endpoint = acme.post("/v1/webhook-endpoints", json={
            "url": threaded_receiver.url("/endpoint"), "description": "orders service",
            "events": ["batch.completed"]}).json()["id"]  # fmt: skip
        foreign = globex.post("/v1/jobs", json=chat("m", "globex's secret plan")).json()["id"]
        eventually(lambda: all(acme.get(f"/v1/jobs/{j}").json()["status"] in ("succeeded", "failed")
                               for j in [*done, refused, hooked]), what="the jobs to end")  # fmt: skip

        # Signing in: the overview, of this tenant only.
        web.open("/dashboard/jobs")
        assert "/dashboard/login" in driver.current_url  # not signed in: the sign-in page
        web.sign_in("hk_notakey", valid=False)
        assert "not valid" in driver.find_element(By.CSS_SELECTOR, "[role=alert]").text
        web.sign_in(keys["acme"])
        assert driver.current_url.endswith("/dashboard/jobs")  # back where it was going
        web.open("/dashboard")
        assert driver.find_element(By.ID, "viewer").text == "tenant acme"
        assert driver.find_element(By.ID, "stat-succeeded").text == "5"
        assert driver.find_element(By.ID, "stat-failed").text == "1"
        assert len(driver.find_elements(By.CSS_SELECTOR, "figure.chart svg")) == 3
        web.shoot("overview")

        # Jobs: the list, its filters, finding one by id.
        web.open("/dashboard/jobs")
        listed = web.text()
        assert all(job_id in listed for job_id in [*done, refused, hooked])
        assert foreign not in listed
        driver.find_element(By.CSS_SELECTOR, "input[name=status][value=failed]").click()
        web.click(driver.find_element(By.CSS_SELECTOR, "form.filters button[type=submit]"))
        eventually(lambda: "status=failed" in driver.current_url, what="the filter")
        rows = driver.find_elements(By.CSS_SELECTOR, "#jobs tbody tr")
        assert len(rows) == 1 and refused in rows[0].text
        web.shoot("jobs")
        driver.find_element(By.ID, "q").send_keys(refused + "\n")
        eventually(
            lambda: driver.current_url.endswith(f"/dashboard/jobs/{refused}"), what="finding"
        )
        assert "the model refused the request" in web.text()
        assert driver.find_element(By.ID, "job-status").text == "failed"

        # A job's events, live: the page shows the stream as the upstream writes it.
        slow = acme.post("/v1/jobs", json=chat("slow")).json()["id"]
        web.open(f"/dashboard/jobs/{slow}")
        live = driver.find_element(By.ID, "live-output")
        eventually(lambda: "one two" in live.text, what="the first words, live")
        assert "eight" not in live.text  # still coming
        web.shoot("job-live")
        arrived = eventually(
            lambda: [
                row.text for row in driver.find_elements(By.CSS_SELECTOR, "#events tr.arrived")
            ],
            what="the last event arriving in the table",
        )
        assert "job.succeeded" in arrived[-1]
        eventually(lambda: driver.find_elements(By.ID, "output-text"), what="the page at the end")
        assert (
            driver.find_element(By.ID, "output-text").text
            == "one two three four five six seven eight"
        )
        assert driver.find_element(By.ID, "job-status").text == "succeeded"

        # Deliveries: the dead letter, replayed, delivered.
        eventually(lambda: acme.get("/v1/deliveries", params={"status": "failed"}).json()["data"],
                   what="the webhook given up on")  # fmt: skip
        web.open("/dashboard/deliveries?status=failed")
        failed_rows = driver.find_elements(By.CSS_SELECTOR, "#deliveries tbody tr")
        assert len(failed_rows) == 1 and "/flaky" in failed_rows[0].text
        web.click(failed_rows[0].find_element(By.CSS_SELECTOR, "a"))
        assert driver.find_element(By.ID, "delivery-state").text == "failed"
        codes = [c.text for c in driver.find_elements(By.CSS_SELECTOR, "#delivery-attempts .code")]
        assert codes == ["500", "503"] and "not now" in web.text()  # with the answer's excerpt
        web.click(driver.find_element(By.ID, "replay"))
        assert driver.find_element(By.ID, "replayed").is_displayed()
        received = eventually(lambda: len(threaded_receiver.at("/flaky")) == 3, what="the replay")
        assert received
        [message] = {r.id for r in threaded_receiver.at("/flaky")}  # one message, tried three times

        def delivered() -> bool:
            driver.refresh()
            return driver.find_element(By.ID, "delivery-state").text == "succeeded"

        eventually(delivered, what="the replay recorded as delivered")
        codes = [c.text for c in driver.find_elements(By.CSS_SELECTOR, "#delivery-attempts .code")]
        assert codes == ["500", "503", "200"]
        web.shoot("delivery")

        # Endpoints: a test event reaches it, it can be disabled and enabled again.
        web.open("/dashboard/endpoints")
        row = driver.find_element(By.ID, endpoint)
        assert "orders service" in row.text and "healthy" in row.text
        web.click(row.find_element(By.CSS_SELECTOR, "button[data-action=test]"))
        assert "Test event queued" in driver.find_element(By.ID, "notice").text
        eventually(
            lambda: len(threaded_receiver.at("/endpoint")) == 2, what="two tries of the test"
        )
        assert b'"type":"endpoint.test"' in threaded_receiver.at("/endpoint")[0].body.replace(
            b" ", b""
        )
        eventually(lambda: acme.get("/v1/deliveries", params={"endpoint_id": endpoint, "status": "failed"}).json()["data"],
                   what="the test event given up on")  # fmt: skip
        web.click(driver.find_element(By.CSS_SELECTOR, f"[id='{endpoint}'] [data-action=replay]"))
        assert "1 failed message(s)" in driver.find_element(By.ID, "notice").text
        eventually(
            lambda: len(threaded_receiver.at("/endpoint")) == 3, what="the endpoint's replay"
        )
        web.click(driver.find_element(By.CSS_SELECTOR, f"[id='{endpoint}'] [data-action=disable]"))
        assert "disabled" in driver.find_element(By.ID, endpoint).text
        assert acme.get(f"/v1/webhook-endpoints/{endpoint}").json()["enabled"] is False
        web.click(driver.find_element(By.CSS_SELECTOR, f"[id='{endpoint}'] [data-action=enable]"))
        assert acme.get(f"/v1/webhook-endpoints/{endpoint}").json()["enabled"] is True
        # Its secret rotated: a new one signs from now on (the old one beside it, its overlap).
        secret_url = f"/v1/webhook-endpoints/{endpoint}/secret"
        old_secret = acme.get(secret_url).json()["secret"]
        web.click(driver.find_element(By.CSS_SELECTOR, f"[id='{endpoint}'] [data-action=rotate]"))
        assert "rotated" in driver.find_element(By.ID, "notice").text
        assert acme.get(secret_url).json()["secret"] != old_secret
        web.shoot("endpoints")
        web.open("/dashboard/upstreams")
        assert "scripted" in web.text()
        web.shoot("upstreams")

        # A batch's progress, which the page follows by itself.
        lines = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
                  "body": {"model": "paced", "messages": [{"role": "user", "content": f"item {i}"}]}}
                 for i in range(6)]  # fmt: skip
        jsonl = "".join(json.dumps(line) + "\n" for line in lines).encode()
        uploaded = acme.post("/v1/files", files={"file": ("in.jsonl", jsonl)},
                             data={"purpose": "batch"}).json()  # fmt: skip
        batch = acme.post("/v1/batches", json={"input_file_id": uploaded["id"],
                          "endpoint": "/v1/chat/completions", "completion_window": "24h"}).json()  # fmt: skip
        web.open("/dashboard/batches")
        progress = f"#batches tr[id='{batch['id']}']"
        first = driver.find_element(By.CSS_SELECTOR, progress).text
        assert "6 / 6" not in first
        eventually(lambda: "6 / 6" in driver.find_element(By.CSS_SELECTOR, progress).text, timeout=30,
                   what="the batch's progress, without a reload")  # fmt: skip
        web.shoot("batches")

        # Readable on a phone: nothing wider than the screen but the tables, which scroll.
        driver.set_window_size(390, 844)
        for path in ("/dashboard", f"/dashboard/jobs/{slow}", "/dashboard/deliveries"):
            web.open(path)
            assert driver.execute_script(
                "return document.body.scrollWidth <= window.innerWidth + 1"
            )
        web.open(f"/dashboard/jobs/{slow}")
        web.shoot("phone-job")
        driver.set_window_size(1280, 900)

        # Another tenant sees none of it, not even by its address.
        web.sign_out()
        web.sign_in(keys["globex"])
        web.open("/dashboard/jobs")
        assert foreign in web.text() and not any(j in web.text() for j in [*done, refused, slow])
        web.open(f"/dashboard/jobs/{refused}")
        assert "Not here" in web.text() and "refused the request" not in web.text()
        web.open(f"/dashboard/deliveries/{message}")
        assert "Not here" in web.text()
        web.open("/dashboard/deliveries")
        assert message not in web.text()
        web.open("/dashboard/endpoints")
        assert endpoint not in web.text()

        # An admin key sees every tenant.
        web.sign_out()
        web.sign_in(keys["admin"])
        assert driver.find_element(By.ID, "viewer").text == "admin · all tenants"
        web.open("/dashboard/jobs")
        assert foreign in web.text() and refused in web.text()
        web.shoot("admin-jobs")
        web.open(f"/dashboard/jobs/{foreign}")
        assert "globex" in web.text()


def test_pages_answer_a_key_in_the_header_and_refuse_a_forged_form(
    site: tuple[Site, dict[str, str]],
) -> None:
    web, keys = site
    url = web.server.url
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {keys['acme']}"}) as tool:
        page = tool.get("/dashboard/jobs")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        endpoint = tool.post("/v1/webhook-endpoints", json={"url": "http://127.0.0.1:9/x"}).json()
        forged = tool.post(f"/dashboard/endpoints/{endpoint['id']}/disable", data={"csrf": "guess"})
        assert forged.status_code == 403
        assert tool.get(f"/v1/webhook-endpoints/{endpoint['id']}").json()["enabled"] is True
    anonymous = httpx.get(f"{url}/dashboard/jobs", follow_redirects=False)
    assert anonymous.status_code == 303 and anonymous.headers["location"].startswith(
        "/dashboard/login"
    )
    paths = httpx.get(f"{url}/openapi.json").json()["paths"]  # (served to anyone)
    assert not [path for path in paths if path.startswith("/dashboard")]  # pages, not the API


async def test_a_sinks_deliveries_are_listed_too(
    database_url: str, upstream: ScriptedUpstream, tmp_path: Path
) -> None:
    directory = tmp_path / "sinks"
    sink = SinkConfig(name="lake", type="jsonl", url=directory.as_uri(), target="lake.jsonl",
                      events=["job.succeeded"])  # fmt: skip
    async with serve(gateway_settings(database_url, upstream.base_url, sinks=[sink])) as live:
        job = (await live.client.post("/v1/jobs", json=chat("m"))).json()
        await wait_for_status(live.client, job["id"], {"succeeded"})
        headers = {"Authorization": f"Bearer {live.api_key}"}
        async with httpx.AsyncClient(base_url=live.base_url, headers=headers) as tool:
            for _ in range(100):
                listed = (await tool.get("/dashboard/deliveries?sink=lake&status=succeeded")).text
                if "sink <strong>lake</strong>" in listed:
                    break
                await asyncio.sleep(0.05)
            assert "sink <strong>lake</strong>" in listed
            message = listed.split('href="/dashboard/deliveries/')[1].split('"')[0]
            page = (await tool.get(f"/dashboard/deliveries/{message}")).text
            assert "Data sink" in page and job["id"] in page
            assert "lake" not in (await tool.get("/dashboard/deliveries?sink=other")).text
