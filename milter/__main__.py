import sys

from milter.cli import main

sys.exit(main())
