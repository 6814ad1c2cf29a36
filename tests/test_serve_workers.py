"""`mnist-cnn serve --workers N`: N processes share the listening port and the load, and all
stop together."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from conftest import assert_one_line_error, run_cli, user_png

STARTUP_SECONDS = 120  # loading torch on a busy 2-core machine can take a while


def children_of(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_two_workers_share_the_load_and_stop_together(shipped_model, mnist, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(shipped_model, model)
    process = subprocess.Popen([sys.executable, "-m", "mnist_cnn", "serve", "--model", str(model), "--port", "0",
                                "--device", "cpu", "--workers", "2"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline, match, lines = time.monotonic() + STARTUP_SECONDS, None, []
        while time.monotonic() < deadline and match is None:
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line)
            match = re.search(r"serving on http://127\.0\.0\.1:(\d+)/.*2 processes", line)
        assert match, "".join(lines) + process.stderr.read()
        port = int(match.group(1))
        workers = [process.pid, *children_of(process.pid)]
        assert len(workers) == 2
        body = user_png(mnist["test"][0][0])

        def predict(_):
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)  # a new one each time
            connection.request("POST", "/api/predict?preprocessed=1", body=body, headers={"content-type": "image/png"})
            response = connection.getresponse()
            answer = (response.status, json.loads(response.read())["label"])
            connection.close()
            return answer

        predict(0)  # both have loaded their models before they listen; warm up anyway
        time.sleep(1)
        before = [cpu_seconds(pid) for pid in workers]
        with ThreadPoolExecutor(8) as pool:
            answers = set(pool.map(predict, range(120)))
        used = [cpu_seconds(pid) - start for pid, start in zip(workers, before)]
        assert answers == {(200, int(mnist["test"][1][0]))}
        assert min(used) >= 0.05, used  # each process answered a share (~3 ms of CPU a request)
        process.send_signal(signal.SIGTERM)  # to the first process only: it stops the other
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
        assert "Traceback" not in err and out.strip().endswith("stopped")
        assert not any(Path(f"/proc/{pid}").exists() for pid in workers[1:])
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_bad_worker_count_is_a_one_line_error():
    assert_one_line_error(run_cli("serve", "--workers", "0"), "--workers", "not a valid number of workers")
