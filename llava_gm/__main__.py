"""`python -m llava_gm ...` is `llava-gm ...`; torchrun runs it as `torchrun --nproc_per_node N -m llava_gm train ...`."""

import sys

from .cli import main

sys.exit(main())
