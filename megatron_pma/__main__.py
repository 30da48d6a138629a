import sys

from megatron_pma.cli import main

sys.exit(main())
