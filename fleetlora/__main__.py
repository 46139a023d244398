import sys

from fleetlora.cli import main

sys.exit(main())
