"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

from django.http import JsonResponse


class ApiError(Exception):
    """A request the API refuses; becomes an error response with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JsonResponse:
        response = JsonResponse(self.body(), status=self.status)
        for name, value in self.headers.items():
            response[name] = value
        return response


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def unauthorized(message: str) -> ApiError:
    return ApiError(401, message, code="invalid_api_key")


def rate_limited(message: str, retry_after_s: int) -> ApiError:
    return ApiError(
        429,
        message,
        type="rate_limit_exceeded",
        code="rate_limit_exceeded",
        headers={"Retry-After": str(retry_after_s)},
    )


# services.ChatError codes that get_model raises, and how the API answers each.
MODEL_ERRORS = {
    "unknown_model": (404, "invalid_request_error", "model_not_found"),
    "no_worker": (503, "server_error", "no_worker"),
}


def model_error(exc) -> ApiError:
    status, type_, code = MODEL_ERRORS.get(exc.code, (400, "invalid_request_error", exc.code))
    return ApiError(status, str(exc), type=type_, code=code, param="model")
