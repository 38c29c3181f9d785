"""A main server for the interoperability test (tests/interop/run): a FastAPI app, run by
uvicorn with mutual TLS (h11 or httptools); the answers and log lines of server.go."""
import itertools
import json
import os

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

app = FastAPI()
VARIANT = os.environ.get("VARIANT") == "1"
LOG = open(os.environ["LOG"], "a", buffering=1)
ANSWERS = itertools.count(1)


def answer(message_id: str, attempt: int) -> int:
    n = int(message_id.removeprefix("m-"))
    if n % 20 == 0:
        return 400
    if n % 10 == 1 and attempt == 1:
        return 503
    return 200


def reply(status: int):
    body = b'{"ok":true}' if status == 200 else b'{"detail":"' + b"x" * (200 * 1024 if VARIANT else 64) + b'"}'
    if not VARIANT:
        return Response(body, status_code=status, media_type="application/json")
    headers = {"connection": "close"} if next(ANSWERS) % 7 == 0 else {}

    async def pieces():
        half = len(body) // 2
        yield body[:half]
        yield body[half:]

    return StreamingResponse(pieces(), status_code=status, media_type="application/json", headers=headers)


@app.post("/internal/messages/deliver")
async def deliver(request: Request):
    body = json.loads(await request.body())
    status = answer(body["message_id"], body["attempt"])
    LOG.write(f"deliver {body['message_id']} {body['attempt']} {status}\n")
    return reply(status)


@app.put("/internal/messages/{message_id}/status")
async def status(message_id: str, request: Request):
    body = json.loads(await request.body())
    LOG.write(f"status {message_id} {body['attempt_count']} {body['status']}\n")
    return reply(200)
