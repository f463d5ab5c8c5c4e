"""Public functions that name themselves when a call does not fit them.

Python reports an unknown keyword, a missing or a surplus argument with the
name of whichever function was called, which for generated functions is an
internal one (``na() got an unexpected keyword argument``). ``public`` makes
such a call raise TypeError('[na2d] ...') with the argument, its value and the
signature, like libna's other argument errors.
"""

from __future__ import annotations

import functools
import inspect
import reprlib


def public(fn, name: str | None = None, title: str | None = None):
    """fn as the public function `name` (default: fn's name), shown as
    ``title(signature)`` in messages (title defaults to name)."""
    name = name or fn.__name__
    signature = inspect.signature(fn)

    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except TypeError:  # the call does not fit, or fn raised TypeError itself
            check_call(name, title or name, signature, args, kwargs)
            raise

    functools.update_wrapper(call, fn)
    call.__signature__ = signature
    return call


def check_call(name: str, title: str, signature: inspect.Signature, args, kwargs) -> None:
    """TypeError('[name] ...') when args and kwargs do not fit signature."""
    try:
        signature.bind(*args, **kwargs)
    except TypeError as error:
        unknown = [key for key in kwargs if key not in signature.parameters]
        problem = (f"got an unexpected keyword argument {unknown[0]}="
                   f"{reprlib.repr(kwargs[unknown[0]])}" if unknown else str(error))
        shown = signature.replace(
            parameters=[p.replace(annotation=p.empty)
                        for p in signature.parameters.values() if p.name != "self"],
            return_annotation=signature.empty)
        raise TypeError(f"[{name}] {problem}; expected {title}{shown}") from None
