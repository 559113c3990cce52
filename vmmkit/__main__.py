import sys

from vmmkit.cli import main

sys.exit(main())
