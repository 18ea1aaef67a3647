"""The database: models, sessions and migrations."""

from dicomnode.db.migrate import upgrade
from dicomnode.db.session import make_engine, make_session_factory

__all__ = ["make_engine", "make_session_factory", "upgrade"]
