"""Stand-in of fastapi.responses.JSONResponse (starlette/responses.py JSONResponse: `content` rendered with
json.dumps(ensure_ascii=False, allow_nan=False, separators=(",", ":")) into `body` bytes, `status_code`)."""
import json


class JSONResponse:
    media_type = "application/json"

    def __init__(self, content=None, status_code=200, headers=None, media_type=None, background=None):
        self.status_code = status_code
        self.body = json.dumps(content, ensure_ascii=False, allow_nan=False, indent=None,
                               separators=(",", ":")).encode("utf-8")
