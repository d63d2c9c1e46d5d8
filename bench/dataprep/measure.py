#!/usr/bin/env python3
"""measure.py OUT.json -- CMD...: run CMD, pass its stdout to OUT.json's
"stdout" field, and record wall seconds, CPU seconds (user + sys of CMD and
its children), peak RSS of the largest child, and a timeline of CMD's own
CPU use (cores busy per 1 s, from /proc; threads count, child processes
do not) and per thread, to tell serial phases from CPU contention."""
import json
import os
import resource
import subprocess
import sys
import threading
import time

out, cmd = sys.argv[1], sys.argv[3:]
assert sys.argv[2] == "--"
t0 = time.perf_counter()
p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
timeline, last, per_thread, threads_last = [], 0.0, [], {}
reader = threading.Thread(target=lambda: setattr(p, "out", p.stdout.read()))
reader.start()
tick = os.sysconf("SC_CLK_TCK")
while p.poll() is None:
    time.sleep(1.0)
    try:
        with open(f"/proc/{p.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / tick
        timeline.append(round(cpu - last, 2))
        last = cpu
        now = {}
        for tid in os.listdir(f"/proc/{p.pid}/task"):
            with open(f"/proc/{p.pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            now[tid] = (int(fields[11]) + int(fields[12])) / tick
        busy = sorted((round(v - threads_last.get(t, 0.0), 2) for t, v in now.items()), reverse=True)
        per_thread.append([b for b in busy if b >= 0.05])
        threads_last = now
    except (OSError, IndexError):
        pass
reader.join()
p.wait()
wall = time.perf_counter() - t0
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(out, "w") as f:
    json.dump({"cmd": cmd, "rc": p.returncode, "wall": round(wall, 2),
               "cpu": round(ru.ru_utime + ru.ru_stime, 2),
               "max_rss_mb": round(ru.ru_maxrss / 1024, 1), "stdout": p.out, "cores_busy_per_s": timeline,
               "threads_busy_per_s": per_thread}, f)
sys.exit(p.returncode)
