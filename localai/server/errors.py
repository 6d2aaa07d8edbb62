"""Errors a client can cause, and how each API spells them.

Every handler raises APIError for a bad request; app.py renders it as OpenAI's
`{"error": {"message", "type", "param", "code"}}` (Ollama routes: `{"error": "..."}`) with the
status it carries. Nothing a client sends should surface as a 500.
"""

from __future__ import annotations

from starlette.responses import JSONResponse


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type,
            param,
            code,
        )

    def openai_body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def model_not_found(name: object, available: list[str]) -> APIError:
    return APIError(
        404,
        f"model {name!r} is not served here; available: {', '.join(available)}",
        param="model",
        code="model_not_found",
    )


def is_ollama_path(path: str) -> bool:
    return path.startswith("/api/")


def render(err: APIError, path: str) -> JSONResponse:
    """The error body in the dialect of the route that raised it."""
    body = {"error": err.message} if is_ollama_path(path) else err.openai_body()
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(body, status_code=err.status, headers=headers)
