"""Stage 4 of a request: pick an endpoint. One policy a file, registered by name.

``policy:`` in the config chooses one; ``registry`` makes them. Importing this package
registers every policy below.
"""

from . import cache_aware, loadaware, longest_prefix, predicted_ttft, round_robin  # noqa: F401
from .base import OptionError  # noqa: F401
from .registry import create, names, spec  # noqa: F401
