import sys

from optirag import cli

if __name__ == "__main__":
    sys.exit(cli.evaluate(sys.argv[1:]))
