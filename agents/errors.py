"""Refusals shared by every app; transports map them to a status code or an error frame."""


class HubError(Exception):
    """A refusal with a machine-readable code."""

    code = "invalid"
    status = 400

    def __init__(self, detail: str, *, code: str | None = None, **extra):
        super().__init__(detail)
        self.detail = detail
        self.extra = extra
        if code:
            self.code = code


class Forbidden(HubError):
    code = "forbidden"
    status = 403
