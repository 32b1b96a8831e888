import sys

from optirag import cli

if __name__ == "__main__":
    sys.exit(cli.partition_candidates(sys.argv[1:]))
