import sys

from fleetlora.cli import main

if __name__ == "__main__":  # multiprocessing's forkserver imports the main module: do not run it there
    sys.exit(main())
