"""Commit-to-receipt latency: one event per transaction at a steady rate, each receipt
timestamped by a loopback receiver against the time its commit returned to the client."""
import argparse, http.server, statistics, subprocess, threading, time

parser = argparse.ArgumentParser()
parser.add_argument("--port", default="55432")
parser.add_argument("--rate", type=float, default=50.0)
parser.add_argument("--count", type=int, default=300)
parser.add_argument("--receiver-port", type=int, default=8097)
args = parser.parse_args()

received = {}

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        at = time.time()
        self.rfile.read(int(self.headers.get("content-length", 0)))
        received[self.headers.get("webhook-id")] = at
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *_):
        pass

server = http.server.ThreadingHTTPServer(("127.0.0.1", args.receiver_port), Handler)
threading.Thread(target=server.serve_forever, daemon=True).start()
psql = ["/usr/lib/postgresql/15/bin/psql", "-X", "-q", "-h", "127.0.0.1", "-p", args.port, "-U", "postgres", "-tA"]
url = f"http://127.0.0.1:{args.receiver_port}/latency"
endpoint = subprocess.check_output(psql + ["-c", f"SELECT outbox.create_endpoint('{url}', event_types => '{{latency.*}}')"], text=True).strip()
session = subprocess.Popen(psql, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
committed = {}
start = time.time()
for i in range(args.count):
    event_id = f"lat-{time.time_ns()}-{i}"
    session.stdin.write(f"SELECT count(*) FROM outbox.enqueue('latency.probe', '{{}}', event_id => '{event_id}');\n")
    session.stdin.flush()
    session.stdout.readline()
    committed[event_id] = time.time()
    time.sleep(max(0.0, start + (i + 1) / args.rate - time.time()))
time.sleep(1.0)
subprocess.call(psql + ["-c", f"SELECT outbox.delete_endpoint('{endpoint}')"], stdout=subprocess.DEVNULL)
ms = sorted((received[k] - t) * 1000 for k, t in committed.items() if k in received)
pick = lambda q: ms[min(len(ms) - 1, int(len(ms) * q))]
print(f"commit -> receipt at {args.rate:.0f}/s: n={len(ms)} of {args.count}, "
      f"p50 {statistics.median(ms):.1f} ms, p95 {pick(0.95):.1f} ms, p99 {pick(0.99):.1f} ms, max {ms[-1]:.1f} ms")
