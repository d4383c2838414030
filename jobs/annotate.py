"""Entrypoint for `ray job submit`: the same flags as `meda annotate`.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \
        -- python jobs/annotate.py --input s3://corpus/videos/ --output s3://runs/run42/ --gpus-per-actor 1

Inside a job, RAY_ADDRESS is set, so the pipeline connects to the cluster instead of starting Ray.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the working dir

from pipeline.annotate import add_annotate_args, config_from_args, run  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(prog="jobs/annotate.py", description="meda annotation job (Ray Data)")
    add_annotate_args(parser)
    args = parser.parse_args()
    try:
        summary = run(config_from_args(args))
    except (ValueError, FileNotFoundError) as e:  # a bad flag, model, input or output: one line, exit 2
        print(f"jobs/annotate.py: error: {e}", file=sys.stderr)
        return 2
    return 0 if summary["rows"] else 1


if __name__ == "__main__":
    sys.exit(main())
