"""The runtime's HTTP server: OpenAI-compatible chat completions, feedback, admin routes and a dashboard.

`runtime serve` runs it with uvicorn; :func:`create_app` builds the FastAPI app for embedding or tests.
"""

from server.app import create_app
from server.limits import ServerLimits

__all__ = ["ServerLimits", "create_app"]
