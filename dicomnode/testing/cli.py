"""``python -m dicomnode.testing.cli``: the ``dicomnode`` command with the test models added
(``echo``), for tests that run ``serve`` or ``worker`` in a child process."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from dicomnode import cli
from dicomnode.testing.models import MODELS


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(argv, builtin_models=MODELS)


if __name__ == "__main__":
    sys.exit(main())
