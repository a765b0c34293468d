#!/usr/bin/env python3
"""Mirror lag under a sustained create load (docs/PERFORMANCE.md).

Usage: python3 scripts/mirror-lag.py MOUNT STATE_DIR WORKERS SECONDS

WORKERS threads each create empty files in a directory of their own under
MOUNT for SECONDS, while the leader's mirror lag is read from
`jfs metastatus --detail --dir STATE_DIR` every 0.5 s. Prints the create
rate and the median, p95 and largest lag seen.
"""
import os
import re
import subprocess
import sys
import threading
import time

mnt, state, workers, secs = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
stop = False
counts = [0] * workers
samples = []


def work(w):
    d = f"{mnt}/lag-w{w}-{int(time.time())}"
    os.mkdir(d)
    i = 0
    while not stop:
        open(f"{d}/f{i}", "wb").close()
        i += 1
        counts[w] = i


def sample():
    while not stop:
        out = subprocess.run(["jfs", "metastatus", "--detail", "--dir", state], capture_output=True, text=True).stdout
        lead = [l for l in out.splitlines() if " leader " in l]
        node = lead[0].split()[0] if lead else None
        for l in out.splitlines():
            m = re.match(rf"node {node}: mirror .*?lag=(\d+) entries/([\d.]+)s", l)
            if m:
                samples.append((int(m.group(1)), float(m.group(2))))
        time.sleep(0.5)


threads = [threading.Thread(target=work, args=(w,)) for w in range(workers)] + [threading.Thread(target=sample)]
t0 = time.time()
for t in threads:
    t.start()
time.sleep(secs)
stop = True
for t in threads:
    t.join()
elapsed = time.time() - t0
n = sum(counts)
if not samples:
    sys.exit("no lag samples: is the mirror on (jfs metastatus --detail shows a MIRROR column)?")
lags = sorted(s[1] for s in samples)
ents = sorted(s[0] for s in samples)
print(
    f"{workers} workers: {n} creates in {elapsed:.1f}s = {n / elapsed:.0f}/s; leader lag over {len(samples)} samples: "
    f"median {lags[len(lags) // 2]:.2f}s / {ents[len(ents) // 2]} entries, p95 {lags[int(len(lags) * .95)]:.2f}s, "
    f"max {lags[-1]:.2f}s / {ents[-1]} entries"
)
