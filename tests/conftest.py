import os
import sys

# tests import their fixture helpers (edm_fixtures) as top-level modules
sys.path.insert(0, os.path.dirname(__file__))
# keep the calibration cache of test runs out of the user's home
os.environ.setdefault("IIA_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "iia"))
