"""Quantization job time against `bitnet convert` on the same model, rounds alternated.

The job's time runs from `POST /v1/quantization/jobs` to the job's `succeeded`, as a client
sees it: a worker inside `bitnet serve` claims it, streams the uploaded tar from the storage,
unpacks it, converts, re-reads and verifies every tensor, measures the fidelity report, and
stores the result sealed. The baselines are `bitnet convert DIR -o OUT --to T` and the same with
`--verify` (the job verifies too). The upload itself is not timed (scripts/bench/upload.py
measures it).

    python3 scripts/bench/job-convert.py --bitnet target/release/bitnet --src /tmp/synth-4l \
        [--to i2_s] [--rounds 2] [--storage file:///tmp/bench-jobs | s3://bitnet-test/bench]

For s3:// the server uses SeaweedFS on 127.0.0.1:8333 with the test credentials
(scripts/tests/seaweedfs.sh starts it). Standard library and curl only.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

AK, SK, ENDPOINT = "bitnet-test", "bitnet-test-secret", "http://127.0.0.1:8333"


def curl(args):
    out = subprocess.run(["curl", "-sS"] + args, check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bitnet", required=True)
    ap.add_argument("--src", required=True, help="a Hugging Face BitNet directory")
    ap.add_argument("--to", default="i2_s")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--storage", default=None)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="bitnet-job-bench-")
    env = dict(os.environ, BITNET_CONFIG=os.path.join(tmp, "none.toml"))
    storage = a.storage or f"file://{tmp}/storage"
    if storage.startswith("s3://"):
        env.update(AWS_ENDPOINT_URL=ENDPOINT, AWS_ACCESS_KEY_ID=AK, AWS_SECRET_ACCESS_KEY=SK,
                   AWS_REGION="us-east-1")
    tar = os.path.join(tmp, "model.tar")
    with tarfile.open(tar, "w") as t:
        t.add(a.src, arcname="model")
    srv = subprocess.Popen(
        [a.bitnet, "serve", "--addr", "127.0.0.1:0", "--database", f"sqlite://{tmp}/bench.db",
         "--storage", storage, "--work-dir", f"{tmp}/work", "--workers", "1"],
        env=env, stderr=subprocess.PIPE, text=True)
    addr = key = None
    for line in srv.stderr:
        m = re.search(r"http://([0-9.:]+)/v1", line)
        if m:
            addr = m.group(1)
        k = re.search(r"(sk-proj-\S+)", line)
        if k:
            key = k.group(1)
        if line.startswith("try:"):
            break
    base, auth = f"http://{addr}/v1", ["-H", f"Authorization: Bearer {key}"]
    try:
        f = curl([f"{base}/files"] + auth + ["-F", "purpose=model", "-F", f"file=@{tar}"])
        print(f"uploaded {f['bytes'] / 1e6:.0f} MB as {f['id']}")
        rows = []
        for r in range(a.rounds):
            times = {}
            for verify in (False, True):
                out = os.path.join(tmp, "out.gguf")
                t0 = time.perf_counter()
                subprocess.run([a.bitnet, "convert", a.src, "-o", out, "--to", a.to]
                               + (["--verify"] if verify else []),
                               check=True, env=env, capture_output=True)
                times["convert --verify" if verify else "convert"] = time.perf_counter() - t0
                os.remove(out)
            t0 = time.perf_counter()
            job = curl([f"{base}/quantization/jobs"] + auth + [
                "-H", "Content-Type: application/json",
                "-d", json.dumps({"file": f["id"], "to": a.to, "name": f"bench{r}"})])
            while job["status"] not in ("succeeded", "failed", "cancelled"):
                time.sleep(0.05)
                job = curl([f"{base}/quantization/jobs/{job['id']}"] + auth)
            times["job"] = time.perf_counter() - t0
            if job["status"] != "succeeded":
                sys.exit(f"job {job['id']} {job['status']}: {job.get('error')}")
            rows.append(times)
            events = curl([f"{base}/quantization/jobs/{job['id']}/events?limit=1000"] + auth)["data"]
            start = events[0]["created_at"] if events else 0
            for e in events:
                if e["data"].get("done") or e["level"] != "info" or "job" in e["message"]:
                    print(f"  +{e['created_at'] - start:>3} s  {e['message']}")
            print(f"round {r + 1}: convert {times['convert']:.2f} s, convert --verify "
                  f"{times['convert --verify']:.2f} s, job {times['job']:.2f} s "
                  f"({times['job'] / times['convert']:.2f}x convert, "
                  f"{times['job'] / times['convert --verify']:.2f}x convert --verify)")
        print(json.dumps({"storage": storage, "to": a.to, "rounds": rows}))
    finally:
        srv.terminate()
        srv.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
