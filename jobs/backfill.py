import sys

from optirag import cli

if __name__ == "__main__":
    sys.exit(cli.backfill(sys.argv[1:]))
