"""kvgate: load with ``mitmdump -s addon/kvcache.py --set kvcache_config=configs/kvgate.yaml``."""

import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
if _here not in sys.path:
    sys.path.insert(0, _here)

from kvgate.addon import KVCacheAddon, spare_module_misses  # noqa: E402

addons = [KVCacheAddon()]
spare_module_misses(globals())  # mitmproxy asks this module for every event by name
