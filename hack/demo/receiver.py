"""A webhook receiver for the local demo: prints every POST it gets, with its signature headers."""
import http.server
import json
import sys


class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        try:
            payload = json.loads(body)
            payload["clientSecret"] = "<redacted>"
            shown = json.dumps(payload)
        except ValueError:
            shown = body.decode("utf-8", "replace")
        print(f"{self.path} webhook-id={self.headers.get('webhook-id')} {shown}", flush=True)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


port = int(sys.argv[1]) if len(sys.argv) > 1 else 9000
http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
