"""Typed errors. The server maps each to an OpenAI error JSON with the status noted here."""

from __future__ import annotations


class PunicaError(Exception):
    """Base of every error Punica raises on purpose."""

    status: int = 500


class InvalidRequestError(PunicaError, ValueError):
    """Bad user input: empty prompt, invalid sampling parameters, bad token ids (400)."""

    status = 400


class PromptTooLongError(InvalidRequestError):
    """The prompt does not fit max_model_len or the KV cache (400)."""


class AdapterNotFoundError(PunicaError, KeyError):
    """A request or call names an adapter that is not registered (404)."""

    status = 404

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class AdapterLoadError(PunicaError, ValueError):
    """An adapter directory is unreadable, corrupt, unsupported or made for another base (400)."""

    status = 400


class AdapterInUseError(PunicaError, RuntimeError):
    """An adapter cannot be removed while requests use it (409)."""

    status = 409


class AdapterFailedError(PunicaError, RuntimeError):
    """An adapter failed while a request used it (its slot fill, or non-finite outputs): the
    failure is charged to that adapter's requests only (422: the adapter, not the server)."""

    status = 422


class StepFailedError(PunicaError, RuntimeError):
    """An engine step raised an unexpected error: the requests in that step fail with it, the
    engine goes on (500; the traceback is logged)."""


class ModelLoadError(PunicaError, ValueError):
    """A checkpoint is unreadable, corrupt or of an unsupported architecture (500 at start)."""


class CapacityError(PunicaError, RuntimeError):
    """The configured KV cache or adapter pool cannot hold what was asked (503)."""

    status = 503


class EngineUnavailableError(CapacityError):
    """No engine of the cluster is alive to serve a request (503)."""


class RequestTooLargeError(InvalidRequestError):
    """A request body, or a count in it (n, prompts, stop strings), passes the server's limits
    (413 for the body, 400 for the counts)."""


class ConfigError(PunicaError, ValueError):
    """A flag or setting is invalid, or the server cannot start with it (`punica` exits 2)."""


class ClusterStartError(PunicaError, RuntimeError):
    """The cluster's engines could not start (resources missing, a bad model or flags)."""


class RateLimitedError(PunicaError, RuntimeError):
    """A tenant is past one of its limits (in flight, tokens per minute): 429, with the seconds
    after which the same request would be accepted (Retry-After)."""

    status = 429

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
