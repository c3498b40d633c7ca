"""The payments service: hosted Stripe payments for internal callers, on trio."""

from payments import purerpc_compat as _purerpc_compat  # noqa: F401  (must precede purerpc)

__version__ = "0.1.0"
