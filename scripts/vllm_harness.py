"""Real vLLM CPU workers behind kvrouter: `check`, `install` or `up`.

A thin entry point (scripts/test.sh runs `check` and `install` with the project venv's
interpreter); the harness is kvrouter.testing.vllm_harness, which tests and benches import.
"""

import sys

from kvrouter.testing.vllm_harness import main

if __name__ == "__main__":
    sys.exit(main())
