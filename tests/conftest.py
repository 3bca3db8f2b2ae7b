import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import tiny  # noqa: E402,F401  (registers the "tiny" test representation)
