"""The web page under load: latency of the cheap endpoints (the page, pictures) while heavy classify requests run.

    python benchmarks/bench_web.py [--labels 200] [--clients 16] [--seconds 10] [--repo /path/to/another/checkout]

Serves predict.py's app (a random-weight tiny model, 40 generated pictures) on 127.0.0.1 in this process. One
thread keeps a classify request with `labels` labels and OpenAI's 80 templates in flight; `clients` threads fetch
"/" and "/images/<picture>" as fast as they are answered. Prints p50 / p95 / max of the cheap requests answered
while a heavy one was running, and the heavy requests' mean time. `--repo` imports the app from another checkout
(an older commit) for a before/after on the same machine.
"""
from __future__ import annotations

import argparse
import http.client
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", type=int, default=200)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--repo", default=str(Path(__file__).resolve().parents[1]))
    args = parser.parse_args()
    sys.path.insert(0, args.repo)

    import numpy as np
    import torch
    import uvicorn
    from PIL import Image

    from clip import CLIP
    from nets import build_model, get_config
    from utils.predict.search import SearchIndex, encode_paths
    from utils.web import app as web

    tmp = Path(tempfile.mkdtemp())
    torch.manual_seed(0)
    torch.save(build_model(get_config("tiny/VIT-T-8")).state_dict(), tmp / "tiny.pth")
    model = CLIP(model_path=str(tmp / "tiny.pth"), phi="auto", cuda=False)
    folder = tmp / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(folder / f"{i:02d}.jpg")
    index = SearchIndex(tmp / "index", "bench")
    index.update(folder, encode_paths(model))
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(web.create_app(model, index, folder, ""), host="127.0.0.1", port=port,
                                           log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)

    heavy_running = threading.Event()
    stop = threading.Event()
    heavy_times: list[float] = []
    picture = (folder / "00.jpg").read_bytes()
    labels = "\n".join(f"label number {i}" for i in range(args.labels))

    def heavy() -> None:
        boundary = uuid.uuid4().hex
        body = (f'--{boundary}\r\nContent-Disposition: form-data; name="texts"\r\n\r\n{labels}\r\n'
                f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n'
                f"Content-Type: image/jpeg\r\n\r\n").encode() + picture + f"\r\n--{boundary}--\r\n".encode()
        while not stop.is_set():
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
            started = time.perf_counter()
            heavy_running.set()
            connection.request("POST", "/api/classify", body,
                               {"Content-Type": f"multipart/form-data; boundary={boundary}"})
            status = connection.getresponse().status
            heavy_running.clear()
            heavy_times.append(time.perf_counter() - started)
            connection.close()
            assert status == 200, status

    latencies: list[float] = []
    lock = threading.Lock()

    def cheap(worker: int) -> None:
        paths = ["/", f"/images/{worker % 40:02d}.jpg"]
        i = 0
        while not stop.is_set():
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
            during = heavy_running.is_set()
            started = time.perf_counter()
            connection.request("GET", paths[i % 2])
            response = connection.getresponse()
            response.read()
            elapsed = time.perf_counter() - started
            connection.close()
            if during and heavy_running.is_set() and response.status == 200:
                with lock:
                    latencies.append(elapsed)
            i += 1

    threads = [threading.Thread(target=heavy)] + [threading.Thread(target=cheap, args=(w,)) for w in range(args.clients)]
    for thread in threads:
        thread.start()
    time.sleep(args.seconds)
    stop.set()
    for thread in threads:
        thread.join()
    server.should_exit = True
    values = np.array(latencies) * 1000
    print(f"app from {args.repo}: {len(values)} cheap requests answered while a classify of {args.labels} labels x "
          f"80 templates ran ({len(heavy_times)} of those, mean {np.mean(heavy_times):.2f} s each), "
          f"{args.clients} clients")
    if len(values):
        print(f"cheap endpoints during heavy work: p50 {np.percentile(values, 50):.0f} ms, "
              f"p95 {np.percentile(values, 95):.0f} ms, max {values.max():.0f} ms")


if __name__ == "__main__":
    main()
