"""``python -m sacpo_jax.merge``: P-SACPO linear weight merging of HF checkpoints."""

import sys

from sacpo_jax.algorithms.merge import main

if __name__ == "__main__":
    sys.exit(main())
