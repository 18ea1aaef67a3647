"""``python -m dicomnode.testing.cli``: the ``dicomnode`` command with the test models added
(``echo``), for tests that run ``serve`` or ``worker`` in a child process. The children of its
``serve`` (workers, extra receivers) run it too, so they have the test models as well."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from dicomnode import cli
from dicomnode.testing.models import MODELS

COMMAND = (sys.executable, "-m", "dicomnode.testing.cli")


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(argv, builtin_models=MODELS, command=COMMAND)


if __name__ == "__main__":
    sys.exit(main())
