"""The HTTP API: jobs, studies, models, health, Prometheus metrics, and the dashboard page.

:func:`create_app` builds the FastAPI application; :class:`ApiServer` serves it from a thread
of ``dicomnode serve``. FastAPI and uvicorn are imported only when the API is built, so the
receiver alone starts without them.
"""

from dicomnode.api.context import ApiContext
from dicomnode.api.server import ApiServer, create_app

__all__ = ["ApiContext", "ApiServer", "create_app"]
