"""The ceiling for the submit benchmark: the same HTTP stack (uvicorn + FastAPI, the body limit
middleware, the same request model) answering ``202`` without touching storage."""

from __future__ import annotations

import orjson
from fastapi import FastAPI
from starlette.responses import Response

from hookline.api.limits import BodyLimitMiddleware
from hookline.api.problems import install_problem_handlers
from hookline.api.schemas import JobCreate
from hookline.cli.server import tune_interpreter
from hookline.ids import new_id

tune_interpreter()  # the same process tuning as `hookline api`, for a fair ceiling

app = FastAPI()
install_problem_handlers(app)
app.add_middleware(BodyLimitMiddleware, max_bytes=10 * 1024 * 1024)


@app.post("/v1/jobs", status_code=202)
async def accept(body: JobCreate) -> Response:
    job_id = new_id("job")
    payload = {"id": job_id, "object": "job", "status": "queued", "input": body.input}
    return Response(
        orjson.dumps(payload),
        status_code=202,
        media_type="application/json",
        headers={"Location": f"/v1/jobs/{job_id}"},
    )
