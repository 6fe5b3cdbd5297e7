import sys

from alignmerge.cli import main

sys.exit(main())
