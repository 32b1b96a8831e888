import sys

from optirag import cli

if __name__ == "__main__":
    sys.exit(cli.generate_synthetic(sys.argv[1:]))
