"""Domain errors shared by every layer. Messages say what was wrong and how to fix it.

The gRPC transport maps each class to a status code in one place
(``rnnzoo.server.transport.interceptors``); the CLI prints them without a traceback.
"""

from __future__ import annotations


class RnnzooError(Exception):
    """Base of every error a user can act on."""

    code = "invalid_argument"


class InvalidArgument(RnnzooError):
    code = "invalid_argument"


class NotFound(RnnzooError):
    code = "not_found"


class AlreadyExists(RnnzooError):
    code = "already_exists"


class ResourceExhausted(RnnzooError):
    code = "resource_exhausted"


class FailedPrecondition(RnnzooError):
    code = "failed_precondition"


class Unavailable(RnnzooError):
    code = "unavailable"


class Unauthenticated(RnnzooError):
    """No valid credentials (the server requires a bearer token or a client certificate)."""

    code = "unauthenticated"


class Unimplemented(RnnzooError):
    """An RPC rnnzoo does not implement; the message says what to use instead."""

    code = "unimplemented"
