"""Upload throughput and memory: `POST /v1/files` of one big file (streamed, sealed, written to
the storage) against a plain `curl` PUT of the same bytes to the same storage (an S3 bucket,
or a file on the same disk), rounds alternated; and the server's resident memory while it
takes the upload, above what it held idle.

    python3 scripts/bench/upload.py --bitnet target/release/bitnet --model M.gguf \
        [--size-mb 5120] [--rounds 2] [--storage file:///tmp/bench-files | s3://bitnet-test/bench]

For s3:// the server and the baseline use SeaweedFS on 127.0.0.1:8333 with the test
credentials (scripts/tests/seaweedfs.sh starts it). Standard library and curl only.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

AK, SK, ENDPOINT = "bitnet-test", "bitnet-test-secret", "http://127.0.0.1:8333"


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bitnet", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--size-mb", type=int, default=5120)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--storage", default="file:///tmp/bitnet-bench-files")
    a = ap.parse_args()

    work = tempfile.mkdtemp(prefix="bitnet-upload-bench-")
    data = os.path.join(work, "data.bin")
    with open(data, "wb") as f:
        for _ in range(a.size_mb // 64):
            f.write(os.urandom(64 << 20))
    size = os.path.getsize(data)
    s3 = a.storage.startswith("s3://")
    env = dict(os.environ)
    if s3:
        env.update(AWS_ACCESS_KEY_ID=AK, AWS_SECRET_ACCESS_KEY=SK, AWS_REGION="us-east-1",
                   AWS_ENDPOINT_URL=ENDPOINT)
    else:
        shutil.rmtree(a.storage[len("file://"):], ignore_errors=True)
    srv = subprocess.Popen(
        [a.bitnet, "serve", "-m", f"smol={a.model}", "--addr", "127.0.0.1:0", "--database",
         f"sqlite://{work}/bench.db", "--storage", a.storage, "--max-file-bytes", str(size + 1)],
        stderr=subprocess.PIPE, text=True, env=env)
    addr = key = None
    for line in srv.stderr:
        if m := re.search(r"http://([0-9.:]+)/v1", line):
            addr = m.group(1)
        if m := re.search(r"(sk-proj-\w+)", line):
            key = m.group(1)
        if line.startswith("try:"):
            break
    threading.Thread(target=lambda: [None for _ in srv.stderr], daemon=True).start()
    if not (addr and key):
        sys.exit("the server printed no key")
    time.sleep(2)
    idle = rss_kib(srv.pid)

    def ours():
        peak = [idle]
        done = threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], rss_kib(srv.pid))
                time.sleep(0.02)

        t = threading.Thread(target=sample)
        t.start()
        start = time.perf_counter()
        out = subprocess.run(
            ["curl", "-sS", "-H", f"Authorization: Bearer {key}", "-F", "purpose=model",
             "-F", f"file=@{data}", f"http://{addr}/v1/files"],
            capture_output=True, text=True, check=True)
        took = time.perf_counter() - start
        done.set()
        t.join()
        f = json.loads(out.stdout)
        if f.get("bytes") != size:
            sys.exit(f"the upload failed: {out.stdout[:500]}")
        subprocess.run(["curl", "-sS", "-X", "DELETE", "-H", f"Authorization: Bearer {key}",
                        f"http://{addr}/v1/files/{f['id']}"], capture_output=True, check=True)
        return took, (peak[0] - idle) / 1024

    def plain(i):
        if s3:
            bucket_path = a.storage[len("s3://"):]
            url = f"{ENDPOINT}/{bucket_path}/plain-{i}"
            cmd = ["curl", "-sS", "--fail", "--aws-sigv4", "aws:amz:us-east-1:s3", "--user",
                   f"{AK}:{SK}", "-T", data, url]
        else:
            dest = os.path.join(a.storage[len("file://"):], f"plain-{i}")
            url = f"file://{dest}"
            cmd = ["curl", "-sS", "-T", data, url]
        start = time.perf_counter()
        subprocess.run(cmd, check=True)
        if not s3:
            # As the server does before it answers: the bytes are on disk.
            fd = os.open(dest, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        took = time.perf_counter() - start
        if s3:
            subprocess.run(["curl", "-sS", "--aws-sigv4", "aws:amz:us-east-1:s3", "--user",
                            f"{AK}:{SK}", "-X", "DELETE", url], check=True)
        else:
            os.remove(dest)
        return took

    mb = size / 1e6
    print(f"{a.size_mb} MiB file, storage {a.storage}, server idle RSS {idle / 1024:.0f} MiB")
    for r in range(a.rounds):
        t_plain = plain(r)
        t_ours, extra = ours()
        print(f"round {r + 1}: POST /v1/files {mb / t_ours:.0f} MB/s ({t_ours:.1f} s), "
              f"plain curl PUT {mb / t_plain:.0f} MB/s ({t_plain:.1f} s), "
              f"ratio {t_plain / t_ours:.2f}; server RSS at most {extra:.0f} MiB above idle")
    srv.terminate()
    srv.wait()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
