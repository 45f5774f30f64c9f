"""The one exception tree of QVD-py.

Every error a user or an operator can meet is one of these; each carries a stable
``code`` (a short slug used in problem+json ``type`` and in the audit log) and the
HTTP status it maps to.  The mapping lives here and nowhere else.

    QvdError                      500  internal
    ├── ConfigError               400  config-invalid      (wrong key or value; names key, value, allowed)
    ├── MalformedRequest          400  malformed           (not JSON, not an object)
    ├── InputError                422  invalid-input       (a value does not fit its field)
    │   ├── FilterError           400  invalid-filter      (bad filter, field or operator)
    │   └── MissingArgument       422  missing-argument
    ├── AuthenticationFailed      401  unauthenticated
    │   └── TooManyFailures       401  too-many-failures   (login or address locked out for a while)
    ├── Forbidden                 403  forbidden
    │   └── Blocked               403  blocked             (user, tenant, VM, DI or host blocked)
    ├── NotFound                  404  not-found
    ├── Conflict                  409  conflict
    │   ├── AlreadyExists         409  already-exists
    │   ├── HasDependents         409  has-dependents
    │   ├── InvalidState          409  invalid-state       (command not allowed in the current state)
    │   ├── IllegalTransition     409  illegal-transition  (state machine refuses a transition)
    │   └── FixedTag              409  fixed-tag
    ├── Unavailable               503  unavailable         (no host, node blocked or not running)
    ├── ImageError                422  image-invalid       (broken or foreign DI tarball)
    └── BackendError              500  backend-error       (LXC/KVM tool failed)

No module raises bare ``Exception``; callers catch the narrowest class they handle.
"""

from __future__ import annotations


class QvdError(Exception):
    """Base of every QVD-py error.  ``str(err)`` is the message shown to people."""

    code = "internal"
    http_status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(QvdError):
    code = "config-invalid"
    http_status = 400


class MalformedRequest(QvdError):
    code = "malformed"
    http_status = 400


class InputError(QvdError):
    code = "invalid-input"
    http_status = 422


class FilterError(InputError):
    code = "invalid-filter"
    http_status = 400


class MissingArgument(InputError):
    code = "missing-argument"
    http_status = 422


class AuthenticationFailed(QvdError):
    code = "unauthenticated"
    http_status = 401


class TooManyFailures(AuthenticationFailed):
    """Refused without looking at the credentials: too many recent failures.

    ``message`` names the login or address and is only logged; clients get
    :attr:`public_message`, the same whether the login exists or not.
    """

    code = "too-many-failures"
    public_message = "Too many failed logins, try again later"


class Forbidden(QvdError):
    code = "forbidden"
    http_status = 403


class Blocked(Forbidden):
    code = "blocked"


class NotFound(QvdError):
    code = "not-found"
    http_status = 404


class Conflict(QvdError):
    code = "conflict"
    http_status = 409


class AlreadyExists(Conflict):
    code = "already-exists"


class HasDependents(Conflict):
    code = "has-dependents"


class InvalidState(Conflict):
    code = "invalid-state"


class IllegalTransition(Conflict):
    code = "illegal-transition"


class FixedTag(Conflict):
    code = "fixed-tag"


class Unavailable(QvdError):
    code = "unavailable"
    http_status = 503


class ImageError(QvdError):
    code = "image-invalid"
    http_status = 422


class BackendError(QvdError):
    code = "backend-error"
    http_status = 500


def short_message(e: BaseException) -> str:
    """One line for a log: our message, else the first line of the exception's text, else its type."""
    if isinstance(e, QvdError):
        return e.message
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
