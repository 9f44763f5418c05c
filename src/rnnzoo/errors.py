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


class StoreUnavailable(Unavailable):
    """The state store cannot be reached or refuses (nothing was changed by the request).
    The server's health follows it (NOT_SERVING until the store answers again)."""


class StoreOutcomeUnknown(StoreUnavailable):
    """A state write was sent and no answer came (a timeout, a connection lost): it may have
    landed or not. The runtime settles it (Aborted naming the position to resend from)."""


class StoreLost(NotFound):
    """The state store no longer has a session this server knew (it restarted without
    persistence, or lost data)."""


class Aborted(RnnzooError):
    """The outcome of a request could not be settled (its state write went to a store that
    stopped answering): the message names the position to resend from."""

    code = "aborted"


class Unauthenticated(RnnzooError):
    """No valid credentials (the server requires a bearer token or a client certificate)."""

    code = "unauthenticated"


class Unimplemented(RnnzooError):
    """An RPC rnnzoo does not implement; the message says what to use instead."""

    code = "unimplemented"
