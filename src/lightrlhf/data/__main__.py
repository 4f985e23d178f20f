"""`python -m lightrlhf.data report data=<data> [overrides]`: see `lightrlhf.data.report`."""

import sys

COMMANDS = ("report",)

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.stderr.write(f"usage: python -m lightrlhf.data {{{','.join(COMMANDS)}}} data=<data> [overrides]\n")
        sys.exit(2)
    from lightrlhf.launch.data_report import main

    main(sys.argv[2:])
