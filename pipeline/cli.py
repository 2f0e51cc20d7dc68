"""The ``covrl`` console script: ``covrl train ...``, ``covrl report RUN_DIR ...``, ``covrl plan --config ...``."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = ("train", "report", "plan")
    if not argv or argv[0] not in commands:
        print(
            f"usage: covrl {{{','.join(commands)}}} [options]   (covrl COMMAND --help for details)",
            file=sys.stderr,
        )
        return 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        from pipeline.train import main as train_main

        return train_main(rest)
    if command == "plan":
        from pipeline.driver.memory_plan import main as plan_main

        return plan_main(rest)
    from pipeline.analysis.report import main as report_main

    return report_main(rest)


if __name__ == "__main__":
    sys.exit(main())
