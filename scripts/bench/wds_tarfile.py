"""Baseline for `motley bench ingest --webdataset`: Python's `tarfile` reading WebDataset tars
into samples grouped by key (the path up to the first dot of the file name), every member's
bytes read, as the `webdataset` library's tar expander does. One thread. Prints one JSON
object on stdout.

    python scripts/bench/wds_tarfile.py --repeat 3 shard-000000.tar shard-000001.tar
"""

import argparse
import json
import os
import tarfile
import time


def samples(path):
    key, members = None, {}
    with tarfile.open(path, mode="r|*") as t:
        for m in t:
            if not m.isfile():
                continue
            head, name = os.path.split(m.name)
            dot = name.find(".")
            k = os.path.join(head, name[:dot] if dot >= 0 else name)
            ext = name[dot + 1 :].lower() if dot >= 0 else ""
            if key is not None and k != key:
                yield key, members
                members = {}
            key = k
            members[ext] = t.extractfile(m).read()
    if key is not None:
        yield key, members


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3, help="best of N timings")
    ap.add_argument("tars", nargs="+")
    args = ap.parse_args()
    best, count = None, 0
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        count = 0
        for p in args.tars:
            for _key, members in samples(p):
                # A sample counts when it has an image, as motley's reader requires.
                count += any(e.rsplit(".", 1)[-1] in ("png", "jpg", "jpeg", "webp") for e in members)
        dt = time.perf_counter() - t0
        best = dt if best is None else min(best, dt)
    print(json.dumps({"samples": count, "seconds": best}))


if __name__ == "__main__":
    main()
