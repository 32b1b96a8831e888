import sys

from optirag import cli

if __name__ == "__main__":
    sys.exit(cli.compare(sys.argv[1:]))
