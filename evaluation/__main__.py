"""``python -m evaluation --checkpoint model.onnx|ckpt.pt --data DIR [--out results.json] [--limit N]``."""

import sys

from evaluation.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
