#!/usr/bin/env python3
"""Every scalar in a TensorBoard log folder, read by TensorBoard's own event reader
(`EventAccumulator`, what `tensorboard --logdir` loads), for comparison with what motley's
`train.tensorboard` meant to write (trainer/tests/train.rs).

    python scripts/reference/tensorboard_scalars.py runs/x/tensorboard

prints {tag: [[step, value], ...]} (steps in order, after TensorBoard's purge of events a
resumed run superseded).
"""

import json
import sys

from tensorboard.backend.event_processing import event_accumulator


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    acc = event_accumulator.EventAccumulator(sys.argv[1], size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    out = {tag: [[e.step, e.value] for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    print(json.dumps(out, sort_keys=True))


if __name__ == "__main__":
    main()
