"""Minerva's errors: a message, an HTTP status, a type, a code and the parameter at fault.

Raised where the fault is known, in any layer; each client surface renders them in its own protocol's shape
(`to_dict()` is the neutral form, which is also OpenAI's `{"error": {...}}` and what a worker publishes)."""


class MinervaError(Exception):
    status, type, code = 400, "invalid_request_error", None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.param = message, param
        if code is not None:
            self.code = code

    def to_dict(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    @classmethod
    def from_dict(cls, data: dict) -> "MinervaError":
        """Rebuild an error that a worker published as an event (status travels alongside)."""
        error = cls(data.get("message", ""), param=data.get("param"), code=data.get("code"))
        error.type = data.get("type", cls.type)
        error.status = int(data.get("status", cls.status))
        return error


class InvalidRequest(MinervaError):
    pass


class ContextLengthExceeded(MinervaError):
    code = "context_length_exceeded"


class ModelNotFound(MinervaError):
    status, code = 404, "model_not_found"

    def __init__(self, model: str):
        super().__init__(f"The model `{model}` does not exist or you do not have access to it.", param="model")
        self.model = model


class NotFound(MinervaError):
    status, code = 404, "not_found"


class MethodNotAllowed(MinervaError):
    status, code = 405, "method_not_allowed"


class PermissionDenied(MinervaError):
    status, type, code = 403, "permission_error", "permission_denied"


class NotImplementedHere(MinervaError):
    """A valid request for something this server does not do (e.g. Ollama's /api/pull)."""

    status, code = 501, "not_implemented"


class InvalidHost(MinervaError):
    code = "invalid_host"


class OriginNotAllowed(MinervaError):
    status, type, code = 403, "permission_error", "origin_not_allowed"


class RequestTooLarge(MinervaError):
    status, code = 413, "request_too_large"


class ServerError(MinervaError):
    status, type, code = 500, "server_error", "internal_error"

    def __init__(self, message: str = "The server had an error while processing your request. Sorry about that!"):
        super().__init__(message)


class ServiceUnavailable(MinervaError):
    status, type, code = 503, "server_error", "service_unavailable"
    retry_after = 1  # seconds, sent as Retry-After


class NoWorker(ServiceUnavailable):
    """No live worker can serve the model (none has its file, or none is running): refused at once, not queued."""

    code, retry_after = "model_unavailable", 5


class Timeout(MinervaError):
    status, type, code = 504, "server_error", "timeout"


class WorkerLost(MinervaError):
    status, type, code = 500, "server_error", "worker_lost"

    def __init__(self):
        super().__init__(
            "The worker running this request stopped unexpectedly; the request was not retried. Try again."
        )


class ModelInUse(MinervaError):
    """A model cannot be deleted while requests for it are queued or running."""

    status, code = 409, "model_in_use"
