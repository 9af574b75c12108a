"""The dashboard (trainer/dashboard): its API over made-up and real workdirs (FastAPI's
TestClient), its guards (token, paths, recipes only), and the page in headless Chromium
(Selenium; Debian's chromium and chromium-driver, which .ci/run installs)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from fastapi.testclient import TestClient

import small_run
from trainer import run_status
from trainer.dashboard import app as app_lib, launcher

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
SCREENSHOTS = os.environ.get("JAXTRAIN_SCREENSHOTS", "")  # where to keep the page's pictures


def fake_run(root, name, rows=(), state=None, pid=None, config=None):
  """A workdir as the trainer leaves one: config.json, metrics.jsonl, status.json."""
  path = root / name
  path.mkdir(parents=True)
  (path / "config.json").write_text(json.dumps(config or {"train": {"steps": 100, "lr": 1e-3}}))
  (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  if state is not None:
    (path / "status.json").write_text(json.dumps({
        "state": state, "pid": pid or os.getpid(), "host": socket.gethostname(),
        "started": 0, "updated": 0, "steps": 100}))
  return path


def test_runs_are_listed_with_the_state_their_workdir_says(tmp_path):
  fake_run(tmp_path, "a", [{"step": 1, "loss": 3.0}], "finished")
  fake_run(tmp_path, "sweep/b", [{"step": 1, "loss": 2.5}], "running")  # this process: alive
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  fake_run(tmp_path, "sweep/c", [], "running", pid=dead.pid)  # its process is gone
  fake_run(tmp_path, "old", [{"step": 5, "loss": 1.0}])  # from before status.json
  (tmp_path / "hf").mkdir()
  (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "llama"}))
  (tmp_path / "notes").mkdir()
  client = TestClient(app_lib.create_app(str(tmp_path)))
  got = client.get("/api/runs").json()
  states = {r["id"]: r["state"] for r in got["runs"]}
  assert states == {"a": "finished", "sweep/b": "running", "sweep/c": "failed", "old": "unknown"}
  assert got["models"] == ["hf"]
  failed = next(r for r in got["runs"] if r["id"] == "sweep/c")
  assert "without a word" in failed["status"]["error"]
  assert next(r for r in got["runs"] if r["id"] == "a")["last"] == {"step": 1, "loss": 3.0}


def test_metrics_are_read_from_where_the_last_poll_stopped(tmp_path):
  path = fake_run(tmp_path, "a", [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}], "running")
  client = TestClient(app_lib.create_app(str(tmp_path)))
  first = client.get("/api/runs/a/metrics").json()
  assert [r["step"] for r in first["rows"]] == [1, 2] and first["next"] == 2
  with open(path / "metrics.jsonl", "a") as f:
    f.write(json.dumps({"step": 3, "loss": 1.5, "eval_loss": 1.7}) + "\n")
    f.write('{"step": 4, "lo')  # being written: waits for the next poll
  second = client.get("/api/runs/a/metrics", params={"since": 2}).json()
  assert second["rows"] == [{"step": 3, "loss": 1.5, "eval_loss": 1.7}] and second["next"] == 3
  with open(path / "metrics.jsonl", "a") as f:
    f.write('ss": 1.2}\n')
  assert client.get("/api/runs/a/metrics", params={"since": 3}).json()["rows"] == [
      {"step": 4, "loss": 1.2}]


def test_compare_lists_the_config_keys_that_differ(tmp_path):
  fake_run(tmp_path, "a", config={"train": {"lr": 1e-3, "steps": 10}, "peft": {"method": "lora"}})
  fake_run(tmp_path, "b", config={"train": {"lr": 3e-4, "steps": 10}, "peft": {"method": "lora"}})
  client = TestClient(app_lib.create_app(str(tmp_path)))
  got = client.get("/api/compare", params=[("ids", "a"), ("ids", "b")]).json()
  assert got == {"differences": {"train.lr": {"a": 1e-3, "b": 3e-4}}}


def test_nothing_outside_the_root_is_read_or_written(tmp_path):
  root = tmp_path / "root"
  root.mkdir()
  fake_run(root, "a", [{"step": 1, "loss": 1.0}], "finished")
  fake_run(tmp_path, "outside", [{"step": 1, "loss": 9.0}], "finished")
  (root / "link").symlink_to(tmp_path / "outside")  # a run reached through a link out
  client = TestClient(app_lib.create_app(str(root)))
  assert [r["id"] for r in client.get("/api/runs").json()["runs"]] == ["a"]
  for path in ("/api/runs/../outside/metrics", "/api/runs/%2e%2e/outside/metrics",
               "/api/runs/link/metrics", "/api/runs/a/../../outside/config",
               "/api/runs//etc/config", "/api/runs/a%2f..%2f..%2foutside/samples"):
    response = client.get(path)
    assert response.status_code == 404, path
    assert "9.0" not in response.text
  assert client.post("/api/chat", json={"model": "../outside", "prompt": "x"}).status_code == 404
  for body, match in ((dict(name="../escape", recipe="tiny.py"), "run name"),
                      (dict(name="x", recipe="../../bin/sh"), "is not one of configs/"),
                      (dict(name="x", recipe="tiny.py", overrides={"train.steps=1 --x": "2"}),
                       "is not a config key"),
                      (dict(name="x", recipe="tiny.py", overrides={"train.steps": "1\n2"}),
                       "one line")):
    response = client.post("/api/launch", json=body)
    assert response.status_code == 400 and match in response.json()["error"], body
  assert sorted(os.listdir(root)) == ["a", "link"]
  assert sorted(os.listdir(tmp_path)) == ["outside", "root"]
  # a launch.json someone edited cannot make resume run anything but a recipe
  path = fake_run(root, "edited", [], "stopped")
  (path / "launch.json").write_text(json.dumps({"recipe": "/bin/sh", "command": ["sh", "-c", ""]}))
  response = client.post("/api/runs/edited/resume")
  assert response.status_code == 400 and "is not one of configs/" in response.json()["error"]


def test_the_launch_form_shows_a_recipes_settings(tmp_path):
  client = TestClient(app_lib.create_app(str(tmp_path)))
  assert "tiny.py" in client.get("/api/recipes").json()["recipes"]
  fields = client.get("/api/recipes/tiny.py", params={"arg": "smoke"}).json()["fields"]
  assert fields["train.steps"] == "40" and fields["model.n_layers"] == "2"
  refused = client.get("/api/recipes/tiny.py", params={"arg": "huge"})
  assert refused.status_code == 400 and "takes no argument or 'smoke'" in refused.json()["error"]
  assert client.get("/api/recipes/..%2f..%2fetc%2fpasswd").status_code in (400, 404)


def test_a_token_guards_every_request(tmp_path):
  fake_run(tmp_path, "a", [], "finished")
  client = TestClient(app_lib.create_app(str(tmp_path), token="sesame"))
  for path in ("/", "/api/runs", "/plotly.min.js", "/static/app.js"):
    assert client.get(path).status_code == 401, path
  assert client.get("/api/runs", headers={"X-Token": "wrong"}).status_code == 401
  assert client.get("/api/runs", headers={"X-Token": "sesame"}).status_code == 200
  first = client.get("/", params={"token": "sesame"})  # the address printed at start
  assert first.status_code == 200 and app_lib.COOKIE in first.cookies
  assert client.get("/api/runs").status_code == 200  # the cookie carries it from then on


def test_the_command_binds_loopback_and_asks_a_token_elsewhere():
  from trainer.dashboard.__main__ import loopback
  assert loopback("127.0.0.1") and loopback("localhost") and loopback("::1")
  assert not loopback("0.0.0.0") and not loopback("192.0.2.7")
  code, _, err = small_run.run_tool("dashboard", "--root=/nonexistent/x")
  assert code == 2 and err.strip() == ("error: --root=/nonexistent/x: give an existing folder "
                                       "(it holds the runs)")
  with socket.socket() as taken:
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    code, _, err = small_run.run_tool("dashboard", "--root=/tmp", f"--port={port}")
  assert code == 2 and err.strip() == (f"error: --host=127.0.0.1 --port={port}: Address already "
                                       "in use")


def test_a_launch_with_a_bad_value_shows_the_command_line_message(tmp_path):
  """The form's values reach trainer.main as --config.KEY=VALUE: its own check refuses them, in
  its own words, and the run's folder is gone again."""
  code, _, err = small_run.run_tool("main", "--config=configs/tiny.py:smoke",
                                    f"--workdir={tmp_path / 'cli'}", "--config.train.lr=-1")
  assert code == 2
  client = TestClient(app_lib.create_app(str(tmp_path)))
  for overrides in ({"train.lr": "-1"}, {"train.stepz": "3"}, {"train.steps": "abc"}):
    response = client.post("/api/launch", json=dict(name="bad", recipe="tiny.py", arg="smoke",
                                                     overrides=overrides))
    assert response.status_code == 400
    if overrides == {"train.lr": "-1"}:
      assert "error: " + response.json()["error"] == err.strip().splitlines()[-1]
    assert not (tmp_path / "bad").exists()


def test_run_status_follows_a_run_to_its_end(tmp_path):
  """status.json as trainer.train.run leaves it: finished at train.steps, stopped before."""
  from trainer import train
  c = small_run.config(steps=4, eval_every=0, checkpoint_every=0, sample_tokens=0,
                       stop_after_steps=2)
  train.run(c, str(tmp_path / "run"))
  status = run_status.read(str(tmp_path / "run"))
  assert status["state"] == "stopped" and status["step"] == 2 and status["steps"] == 4
  train.run(c, str(tmp_path / "run"))
  assert run_status.read(str(tmp_path / "run"))["state"] == "finished"
  c.train.lr = float("nan")
  with pytest.raises(Exception):
    train.run(c, str(tmp_path / "run"))
  status = run_status.read(str(tmp_path / "run"))
  assert status["state"] == "failed" and "train.lr" in status["error"]


def test_chat_samples_a_model_folder_as_trainer_generate_does(tmp_path):
  import hf_models
  hf_models.make("llama", str(tmp_path / "exported"))
  hf_models.make_tokenizer("qwen2", str(tmp_path / "exported"))
  client = TestClient(app_lib.create_app(str(tmp_path)))
  assert client.get("/api/runs").json()["models"] == ["exported"]
  got = client.post("/api/chat", json={"model": "exported", "prompt": "def f", "max_new_tokens": 6,
                                       "temperature": 0.8, "top_k": 20, "seed": 3})
  assert got.status_code == 200, got.text
  code, out, err = small_run.run_tool("generate", f"--hf={tmp_path / 'exported'}",
                                      "--prompt=def f", "--max_new_tokens=6",
                                      "--temperature=0.8", "--top_k=20", "--seed=3")
  assert code == 0, err
  assert got.json()["text"] == out[:-1] and got.json()["tokens"] == 6
  bad = client.post("/api/chat", json={"model": "exported", "prompt": "x", "top_p": 0})
  assert bad.status_code == 400 and "top_p" in bad.json()["error"]


def test_sigterm_while_a_run_gets_ready_stops_it_cleanly(tmp_path):
  """A stop that lands before the training loop (data, tokenizer, compilation) takes effect
  after the first step: a checkpoint, "stopped", exit code 0, no traceback."""
  workdir = tmp_path / "run"
  proc = subprocess.Popen([sys.executable, "-m", "trainer.main", "--config=configs/tiny.py:smoke",
                           f"--workdir={workdir}", "--config.train.steps=100000"],
                          cwd=small_run.REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  deadline = time.time() + 120
  while run_status.read(str(workdir)) is None and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0 and "Traceback" not in err, err
  assert run_status.read(str(workdir))["state"] == "stopped"
  assert os.listdir(workdir / "checkpoints")


# --- in a browser -------------------------------------------------------------------------------

def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture
def served(tmp_path):
  """The dashboard of tmp_path/root on a free loopback port, in this process (uvicorn)."""
  import uvicorn
  root = tmp_path / "root"
  root.mkdir()
  port = free_port()
  server = uvicorn.Server(uvicorn.Config(app_lib.create_app(str(root)), host="127.0.0.1",
                                         port=port, log_level="warning"))
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  deadline = time.time() + 30
  while not server.started and time.time() < deadline:
    time.sleep(0.05)
  yield root, f"http://127.0.0.1:{port}/"
  server.should_exit = True
  thread.join(10)
  for proc in list(launcher._processes.values()):  # any trainer a failed test left running
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture
def browser():
  if not (CHROMIUM and DRIVER):
    pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium "
                "chromium-driver; .ci/run does)")
  from selenium import webdriver
  options = webdriver.ChromeOptions()
  for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
               "--window-size=1400,1000"):
    options.add_argument(flag)
  options.binary_location = CHROMIUM
  driver = webdriver.Chrome(service=webdriver.ChromeService(DRIVER), options=options)
  yield driver
  driver.quit()


def wait_for(predicate, timeout, what):
  deadline = time.time() + timeout
  while time.time() < deadline:
    value = predicate()
    if value:
      return value
    time.sleep(0.25)
  raise AssertionError(f"waited {timeout} s for {what}")


def shot(driver, name, tmp_path):
  driver.save_screenshot(str(tmp_path / f"{name}.png"))
  if SCREENSHOTS:
    os.makedirs(SCREENSHOTS, exist_ok=True)
    driver.save_screenshot(os.path.join(SCREENSHOTS, f"{name}.png"))


@pytest.mark.slow  # two real training runs: .ci/run runs the slow cases after the default suite
def test_the_page_in_a_browser(served, browser, tmp_path):
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support.ui import Select
  root, url = served
  js = browser.execute_script
  state_of = lambda run: js(f"const r = document.querySelector('li.run[data-id=\"{run}\"]');"
                            "return r ? r.dataset.state : null;")
  points = lambda: js("const c = document.getElementById('chart-loss');"
                      "return c && c.data ? c.data[0].x.length : 0;")

  # a run appears, and its curve gains the points written to its metrics as they come
  watched = fake_run(root, "watched", [{"step": s, "loss": 5.0 - s / 10, "lr": 1e-3}
                                       for s in range(1, 6)], "running")
  browser.get(url)
  wait_for(lambda: state_of("watched") == "running", 30, "the run in the list")
  browser.find_element(By.CSS_SELECTOR, 'li.run[data-id="watched"] input.pick').click()
  wait_for(lambda: points() == 5, 30, "5 points")
  with open(watched / "metrics.jsonl", "a") as f:
    for s in range(6, 9):
      f.write(json.dumps({"step": s, "loss": 5.0 - s / 10, "lr": 1e-3}) + "\n")
  wait_for(lambda: points() == 8, 30, "the 3 new points")
  shot(browser, "dashboard_curves", tmp_path)

  # a bad value: the command line's message, in the form
  browser.find_element(By.CSS_SELECTOR, 'nav button[data-tab="launch"]').click()
  Select(browser.find_element(By.ID, "recipe")).select_by_value("tiny.py")
  browser.find_element(By.ID, "recipe-arg").send_keys("smoke")
  browser.find_element(By.ID, "run-name").send_keys("smoke")
  overrides = browser.find_element(By.ID, "overrides")
  overrides.send_keys("train.lr=-1")
  browser.find_element(By.ID, "launch").click()
  error = wait_for(lambda: browser.find_element(By.ID, "launch-error").text, 120, "the error")
  assert error == "config key train.lr: must be positive, got -1.0"
  shot(browser, "dashboard_launch", tmp_path)

  # a launched smoke run finishes and shows up as finished; one setting edited in the table
  overrides.clear()
  overrides.send_keys("train.eval_every=0\ntrain.checkpoint_every=0\ntrain.sample_tokens=6")
  steps = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR,
                                                 'input.field[data-key="train.steps"]'),
                   30, "the recipe's settings")[0]
  assert steps.get_attribute("value") == "40"  # tiny.py:smoke's
  steps.clear()
  steps.send_keys("6")
  browser.find_element(By.ID, "launch").click()
  wait_for(lambda: browser.find_element(By.ID, "launch-ok").text, 120, "the launch")
  wait_for(lambda: state_of("smoke") == "finished", 300, "the smoke run to finish")
  browser.find_element(By.CSS_SELECTOR, 'nav button[data-tab="samples"]').click()
  wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#samples .sample"), 30, "the sample")
  shot(browser, "dashboard_samples", tmp_path)

  # stop: SIGTERM, a checkpoint, "stopped"; resume from the page runs it on
  browser.find_element(By.CSS_SELECTOR, 'nav button[data-tab="launch"]').click()
  browser.find_element(By.ID, "run-name").clear()
  browser.find_element(By.ID, "run-name").send_keys("long")
  overrides.clear()
  overrides.send_keys("train.steps=100000\ntrain.eval_every=0\ntrain.checkpoint_every=0\n"
                      "train.log_every=1")
  browser.find_element(By.ID, "launch").click()
  wait_for(lambda: (root / "long" / "metrics.jsonl").exists()
           and (root / "long" / "metrics.jsonl").read_text().count("\n") >= 2, 300,
           "the long run's first steps")
  browser.find_element(By.CSS_SELECTOR, 'li.run[data-id="long"] button.stop').click()
  wait_for(lambda: state_of("long") == "stopped", 120, "the stop")
  assert [d for d in os.listdir(root / "long" / "checkpoints") if d.isdigit()]
  lines = (root / "long" / "metrics.jsonl").read_text().count("\n")
  browser.find_element(By.CSS_SELECTOR, 'li.run[data-id="long"] button.resume').click()
  wait_for(lambda: state_of("long") == "running", 120, "the resumed run")
  wait_for(lambda: (root / "long" / "metrics.jsonl").read_text().count("\n") > lines, 300,
           "the resumed run's steps")
  launcher.stop(str(root), "long")
  wait_for(lambda: state_of("long") == "stopped", 120, "the second stop")

  # chat with the finished run: the project's sampler, greedy, as trainer.generate says
  browser.find_element(By.CSS_SELECTOR, 'nav button[data-tab="chat"]').click()
  Select(browser.find_element(By.ID, "chat-source")).select_by_value("run:smoke")
  browser.find_element(By.ID, "prompt").send_keys("def ")
  browser.find_element(By.ID, "chat-max").clear()
  browser.find_element(By.ID, "chat-max").send_keys("8")
  browser.find_element(By.ID, "send").click()
  reply = wait_for(lambda: browser.find_element(By.ID, "reply-stats").text
                   and browser.find_element(By.ID, "reply").text, 120, "the reply")
  code, out, err = small_run.run_tool("generate", f"--workdir={root / 'smoke'}", "--prompt=def ",
                                      "--max_new_tokens=8")
  assert code == 0, err
  assert reply.strip() == out.strip()
  shot(browser, "dashboard_chat", tmp_path)
