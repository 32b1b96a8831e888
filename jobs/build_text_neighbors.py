import sys

from optirag import cli

if __name__ == "__main__":
    sys.exit(cli.build_text_neighbors(sys.argv[1:]))
