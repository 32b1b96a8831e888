import sys

from optirag import cli

if __name__ == "__main__":
    sys.exit(cli.score(sys.argv[1:]))
