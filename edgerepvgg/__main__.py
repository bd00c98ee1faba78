import sys

from edgerepvgg.cli import main

sys.exit(main())
