#!/usr/bin/env python3
"""The dashboard in a real browser: headless Chromium driven through chromedriver (selenium),
against the real modrun binary. Usage: test_dashboard.py MODRUN_BINARY SCREENSHOT_DIR

Checks: a module's form is generated from its parameters (types, bounds, defaults, required,
secret) and a 422 puts each message next to its field; a launched run's output arrives live
with ANSI colours rendered as text; the runs table changes without a reload (one EventSource
on /events); Cancel stops a run; a stream cut mid-way resumes with no line missing or twice;
signing in with a token sets an HttpOnly cookie that the page and its streams use.
"""

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

HERE = os.path.dirname(os.path.abspath(__file__))
BIN = os.path.abspath(sys.argv[1])
SHOTS = os.path.abspath(sys.argv[2])
os.makedirs(SHOTS, exist_ok=True)
WORK = tempfile.mkdtemp(prefix="modrun-browser-")


def start_server(config_text, name):
    """A `modrun serve` on a free port; returns (process, base URL)."""
    path = os.path.join(WORK, f"{name}.toml")
    with open(path, "w") as f:
        f.write(config_text)
    env = dict(os.environ, MODRUN_STORAGE__PATH=os.path.join(WORK, f"{name}-data"), RUST_LOG="info")
    log = open(os.path.join(WORK, f"{name}.log"), "w+")
    proc = subprocess.Popen([BIN, "serve", "--config", path], stderr=log, env=env)
    deadline = time.time() + 30
    while time.time() < deadline:
        log.seek(0)
        m = re.search(r"listening on (http://[0-9.:]+)", log.read())
        if m:
            return proc, m.group(1)
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    log.seek(0)
    raise SystemExit(f"the server did not start:\n{log.read()}")


def call(base, method, path, body=None, token=None):
    req = urllib.request.Request(base + path, method=method)
    if body is not None:
        req.data = json.dumps(body).encode()
        req.add_header("content-type", "application/json")
    if token:
        req.add_header("authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=30) as res:
        return json.loads(res.read() or b"null")


def shut(*socks):
    """Both directions of each socket, whatever state it is in."""
    for s in socks:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class CuttingProxy:
    """A TCP proxy that cuts a connection once it has passed `cut` bytes of a run's event
    stream to the browser (other requests pass whole)."""

    def __init__(self, target, cut):
        host, port = target.replace("http://", "").split(":")
        self.target = (host, int(port))
        self.cut = cut
        self.cuts = 0
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.base = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            client, _ = self.sock.accept()
            threading.Thread(target=self.serve, args=(client,), daemon=True).start()

    def serve(self, client):
        server = socket.create_connection(self.target)
        streaming = threading.Event()

        def up():
            try:
                while True:
                    data = client.recv(65536)
                    if not data:
                        break
                    if re.match(rb"GET /runs/[^ ]+/stream ", data):
                        streaming.set()
                    server.sendall(data)
            except OSError:
                pass
            finally:
                shut(client, server)

        threading.Thread(target=up, daemon=True).start()
        passed = 0
        try:
            while True:
                data = server.recv(4096)
                if not data:
                    break
                if streaming.is_set():
                    room = self.cut - passed
                    client.sendall(data[:room])
                    passed += min(len(data), room)
                    if passed >= self.cut:
                        self.cuts += 1
                        break
                else:
                    client.sendall(data)
        except OSError:
            pass
        finally:
            shut(client, server)
            client.close()
            server.close()


def browser():
    opts = Options()
    opts.binary_location = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    for a in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              "--window-size=1280,900"]:
        opts.add_argument(a)
    service = Service(os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver"))
    return webdriver.Chrome(service=service, options=opts)


def wait(driver, what, timeout=30):
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: what(d))
    except TimeoutException:
        driver.save_screenshot(os.path.join(SHOTS, "failure.png"))
        raise


def css(driver, selector):
    return driver.find_element(By.CSS_SELECTOR, selector)


def click(driver, selector):
    """Click what `selector` finds, finding it again if the page re-rendered it meanwhile
    (a live row is rebuilt on each change of its run)."""
    for _ in range(20):
        try:
            css(driver, selector).click()
            return
        except StaleElementReferenceException:
            time.sleep(0.1)
    raise AssertionError(f"{selector} kept changing")


def log_lines(driver):
    return driver.execute_script(
        "return [...document.querySelectorAll('#log .line:not(.note)')].map(e => e.textContent)")


def test_form_and_live_output(driver, base):
    driver.get(base + "/#/modules")
    wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "li[data-module=greet] a"))
    css(driver, "li[data-module=greet] a").click()
    wait(driver, lambda d: d.find_elements(By.ID, "param-name"))
    times = css(driver, "#param-times")
    assert times.get_attribute("type") == "number"
    assert (times.get_attribute("min"), times.get_attribute("max")) == ("1", "5")
    assert times.get_attribute("value") == "1", "the default is filled in"
    language = Select(css(driver, "#param-language"))
    assert [o.text for o in language.options] == ["en", "fr"]
    assert language.first_selected_option.text == "en"
    shout = css(driver, "#param-shout")
    assert shout.get_attribute("type") == "checkbox" and not shout.is_selected()
    assert css(driver, "#param-password").get_attribute("type") == "password"
    assert "*" in css(driver, "[data-param=name] label").text, "required is marked"
    driver.save_screenshot(os.path.join(SHOTS, "module-form.png"))

    # A 422 puts each message next to its field.
    times.clear()
    times.send_keys("9")
    css(driver, "#launch").click()
    wait(driver, lambda d: css(d, "[data-error-for=name]").text and css(d, "[data-error-for=times]").text)
    assert "required" in css(driver, "[data-error-for=name]").text
    assert "5" in css(driver, "[data-error-for=times]").text
    assert "#/runs/" not in driver.current_url

    css(driver, "#param-name").send_keys("Ada")
    times.clear()
    times.send_keys("2")
    language.select_by_visible_text("fr")
    shout.click()
    css(driver, "#launch").click()
    wait(driver, lambda d: "#/runs/" in d.current_url)
    wait(driver, lambda d: css(d, "#run-status").text == "succeeded")
    wait(driver, lambda d: log_lines(d) == ["BONJOUR, Ada (2 times)"])
    green = css(driver, "#log .line span.ansi-fg-2")
    assert green.text == "BONJOUR", "ANSI colour rendered as a class, the text as text"
    assert "\x1b" not in css(driver, "#log").text
    driver.save_screenshot(os.path.join(SHOTS, "run-page.png"))

    # Run again: the form comes back with the run's parameters.
    css(driver, "#run-again").click()
    wait(driver, lambda d: d.find_elements(By.ID, "param-name") and css(d, "#param-name").get_attribute("value") == "Ada")
    assert css(driver, "#param-times").get_attribute("value") == "2"
    assert css(driver, "#param-shout").is_selected()


def test_live_table_and_cancel(driver, base):
    driver.get(base + "/#/runs")
    wait(driver, lambda d: css(d, "#live-state").text == "live")
    driver.execute_script("window.__noReload = 42")
    run = call(base, "POST", "/runs", {"module_id": "sleep"})
    row = f"tr[data-run='{run['id']}']"
    wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, row) and css(d, row).get_attribute("data-status") == "running")
    driver.save_screenshot(os.path.join(SHOTS, "runs.png"))
    # Cancel from the run's page.
    click(driver, f"{row} a")
    wait(driver, lambda d: "sleeping" in log_lines(d))
    css(driver, "#run-cancel").click()
    wait(driver, lambda d: css(d, "#run-status").text == "cancelled")
    wait(driver, lambda d: "interrupted" in log_lines(d))
    # Back on the table, the same page: its row changed without a reload.
    driver.execute_script("history.back()")
    wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, row) and css(d, row).get_attribute("data-status") == "cancelled")
    assert driver.execute_script("return window.__noReload") == 42, "the page never reloaded"
    # Filters: by module and status.
    Select(css(driver, "#filter-status")).select_by_visible_text("succeeded")
    wait(driver, lambda d: not d.find_elements(By.CSS_SELECTOR, row))
    statuses = driver.execute_script(
        "return [...document.querySelectorAll('#runs-body tr')].map(r => r.dataset.status)")
    assert statuses and set(statuses) == {"succeeded"}, statuses


def test_stream_cut_resumes(driver, base):
    proxy = CuttingProxy(base, 6000)
    run = call(base, "POST", "/runs?wait=30", {"module_id": "ticks", "parameters": {"n": 300}})
    assert run["status"] == "succeeded"
    driver.get(proxy.base + f"/#/runs/{run['id']}")
    want = [f"tick {i}" for i in range(1, 301)] + ["done"]
    wait(driver, lambda d: len(log_lines(d)) >= len(want), timeout=90)
    got = log_lines(driver)
    assert got == want, f"{len(got)} lines; first differences: {[(i, a, b) for i, (a, b) in enumerate(zip(got, want)) if a != b][:3]}"
    assert proxy.cuts >= 2, proxy.cuts
    stderr = driver.find_elements(By.CSS_SELECTOR, "#log .line.stderr")
    assert [e.text for e in stderr] == ["done"], "stderr told apart"


def test_sign_in(driver):
    out = subprocess.run([BIN, "token", "new", "--name", "ui", "--module", "greet"],
                         check=True, capture_output=True, text=True).stdout
    token = out.splitlines()[0]
    entry = out[out.index("[[auth.tokens]]"):]
    with open(os.path.join(HERE, "modrun.toml")) as f:
        config = f.read()
    proc, base = start_server(config + "\n" + entry, "tokens")
    try:
        driver.get(base + "/")
        wait(driver, lambda d: css(d, "#view-signin").is_displayed())
        css(driver, "#signin-token").send_keys("wrong-token")
        css(driver, "#signin-form button").click()
        wait(driver, lambda d: css(d, "#signin-error").text)
        css(driver, "#signin-token").clear()
        css(driver, "#signin-token").send_keys(token)
        css(driver, "#signin-form button").click()
        wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "li[data-module=greet]"))
        assert "signed in as ui" in css(driver, "#who").text
        assert not driver.find_elements(By.CSS_SELECTOR, "li[data-module=sleep]"), "only the token's modules"
        assert "modrun_session" not in driver.execute_script("return document.cookie"), "HttpOnly"
        # The cookie carries the streams too: a run's live page works.
        run = call(base, "POST", "/runs?wait=30", {"module_id": "greet", "parameters": {"name": "Bo"}}, token)
        driver.get(base + f"/#/runs/{run['id']}")
        wait(driver, lambda d: log_lines(d) == ["Hello, Bo (1 times)"])
        css(driver, "#sign-out").click()
        wait(driver, lambda d: css(d, "#view-signin").is_displayed())
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def main():
    with open(os.path.join(HERE, "modrun.toml")) as f:
        proc, base = start_server(f.read(), "main")
    driver = browser()
    failed = False
    try:
        for test in (test_form_and_live_output, test_live_table_and_cancel, test_stream_cut_resumes):
            started = time.time()
            test(driver, base)
            print(f"ok   {test.__name__} ({time.time() - started:.1f} s)", flush=True)
        started = time.time()
        test_sign_in(driver)
        print(f"ok   test_sign_in ({time.time() - started:.1f} s)", flush=True)
    except Exception:
        failed = True
        import traceback
        traceback.print_exc()
        for name in ("main", "tokens"):
            p = os.path.join(WORK, f"{name}.log")
            if os.path.exists(p):
                print(f"--- {name} server log (last lines)")
                print("".join(open(p).readlines()[-30:]))
    finally:
        driver.quit()
        proc.terminate()
        proc.wait(timeout=20)
    if failed:
        sys.exit(1)
    print(f"browser tests passed; screenshots in {SHOTS}")


if __name__ == "__main__":
    main()
