"""Entry point for `ray job submit`: the same arguments as `emotion-ray evaluate`.

    ray job submit --address http://HEAD:8265 --working-dir . \
        --runtime-env-json '{"env_vars": {"TF_USE_LEGACY_KERAS": "1"}}' \
        -- python jobs/evaluate.py --help
"""

import sys
from pathlib import Path

# The job's working directory holds the package; Ray puts it on the workers' path, not this script's.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from emotion_ray.cli import main  # noqa: E402  (main sets the process up before TensorFlow loads)

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
