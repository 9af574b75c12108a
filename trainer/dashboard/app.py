"""The dashboard's web application: FastAPI (on Starlette, served by uvicorn) for the JSON API
and the page; the page draws with Plotly.js, served from the plotly package's own copy (no
network). `create_app(root)` is what `python -m trainer.dashboard` serves and the tests call.

    GET  /                                 the page (static/index.html, app.js, style.css)
    GET  /api/runs                         every run (status, last metrics) and model folder
    GET  /api/runs/{id}/metrics?since=N    metrics.jsonl lines from line N on, and the new N
    GET  /api/runs/{id}/config             the resolved config (config.json)
    GET  /api/runs/{id}/samples            the samples the run generated (samples.jsonl)
    GET  /api/runs/{id}/log                the end of a launched run's log
    GET  /api/compare?ids=a&ids=b          the config keys whose values differ
    GET  /api/recipes                      configs/*.py
    GET  /api/recipes/{file}?arg=          a recipe's settings, for the launch form
    POST /api/launch                       {name, recipe, arg, overrides}: start a run
    POST /api/runs/{id}/stop | resume      SIGTERM (it checkpoints) | run it again
    POST /api/chat                         {run | model, step, prompt, sampling...}: a reply

Refusals are {"error": one line} with status 400 (bad request), 404 (no such run) or 401 (no
token). With a token (any host but loopback), every request carries it: ?token=..., the
X-Token header, or the cookie the page gets on its first visit with ?token=.
"""

from __future__ import annotations

import hmac
import os

import plotly
from fastapi import FastAPI, Query, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from trainer.dashboard import chat, launcher, runs
from trainer.errors import UserError

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
PLOTLY_JS = os.path.join(os.path.dirname(plotly.__file__), "package_data", "plotly.min.js")
COOKIE = "jaxtrain_token"


class Launch(BaseModel):
  name: str
  recipe: str
  arg: str = ""
  overrides: dict[str, str] = {}


class Chat(BaseModel):
  run: str = ""  # a run's id, or
  model: str = ""  # a Hugging Face folder's id
  step: int | None = None
  prompt: str
  max_new_tokens: int = 64
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  chat: bool = False


def _refuse(status: int, message: str) -> JSONResponse:
  return JSONResponse({"error": message}, status_code=status)


def create_app(root: str, token: str | None = None) -> FastAPI:
  """The application over the runs under `root`; `token`: required of every request."""
  root = os.path.realpath(root)
  app = FastAPI(title="jaxtrain dashboard", docs_url=None, redoc_url=None, openapi_url=None)

  @app.middleware("http")
  async def check_token(request: Request, call_next):
    if token is None:
      return await call_next(request)
    given = (request.query_params.get("token") or request.headers.get("x-token")
             or request.cookies.get(COOKIE) or "")
    if not hmac.compare_digest(given.encode(), token.encode()):
      return _refuse(401, "this dashboard needs its token: open the address it printed at start")
    response = await call_next(request)
    if request.query_params.get("token"):
      response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
    return response

  @app.exception_handler(UserError)
  async def user_error(request, e: UserError):
    return _refuse(400, str(e))

  @app.exception_handler(runs.NotFound)
  async def not_found(request, e: runs.NotFound):
    return _refuse(404, str(e))

  @app.get("/")
  def page():
    return FileResponse(os.path.join(STATIC, "index.html"))

  @app.get("/plotly.min.js")
  def plotly_js():
    return FileResponse(PLOTLY_JS, media_type="text/javascript")

  app.mount("/static", StaticFiles(directory=STATIC), name="static")

  @app.get("/api/runs")
  def list_runs():
    launcher.reap()
    found = runs.discover(root)
    listed = []
    for run_id in found["runs"]:
      try:
        listed.append(runs.summary(root, run_id))
      except runs.NotFound:  # removed since the walk
        continue
    return {"root": root, "runs": listed, "models": found["models"]}

  @app.get("/api/runs/{run_id:path}/metrics")
  def metrics(run_id: str, since: int = Query(0, ge=0)):
    rows, upto = runs.metrics(runs.folder(root, run_id), since)
    return {"rows": rows, "next": upto}

  @app.get("/api/runs/{run_id:path}/config")
  def config(run_id: str):
    return runs.config(runs.folder(root, run_id)) or {}

  @app.get("/api/runs/{run_id:path}/samples")
  def samples(run_id: str):
    return runs.samples(runs.folder(root, run_id))

  @app.get("/api/runs/{run_id:path}/log")
  def log(run_id: str):
    path = os.path.join(runs.folder(root, run_id), launcher.LOG)
    try:
      with open(path, errors="replace") as f:
        return {"log": f.read()[-20000:]}
    except OSError:
      return {"log": ""}

  @app.post("/api/runs/{run_id:path}/stop")
  def stop(run_id: str):
    launcher.stop(root, run_id)
    return {"ok": True}

  @app.post("/api/runs/{run_id:path}/resume")
  def resume(run_id: str):
    launcher.resume(root, run_id)
    return {"ok": True}

  @app.get("/api/compare")
  def compare(ids: list[str] = Query(...)):
    configs = {i: runs.config(runs.folder(root, i)) for i in ids}
    return {"differences": runs.differences(configs)}

  @app.get("/api/recipes")
  def recipes():
    return {"recipes": launcher.recipes()}

  @app.get("/api/recipes/{recipe}")
  def recipe_fields(recipe: str, arg: str = ""):
    return {"fields": launcher.fields(recipe, arg)}

  @app.post("/api/launch")
  def launch(body: Launch):
    return {"id": launcher.launch(root, body.name, body.recipe, body.arg, body.overrides)}

  @app.post("/api/chat")
  def reply(body: Chat):
    if bool(body.run) == bool(body.model):
      raise UserError("pick a run or a model folder")
    workdir = runs.folder(root, body.run) if body.run else None
    hf_dir = runs.folder(root, body.model, "model") if body.model else None
    return chat.reply(workdir, hf_dir, body.prompt, step=body.step,
                      max_new_tokens=body.max_new_tokens, temperature=body.temperature,
                      top_k=body.top_k, top_p=body.top_p, seed=body.seed, chat=body.chat)

  return app
