"""Test helpers for downloads: a tar archive's bytes, and an http(s) server of files on
loopback."""

from __future__ import annotations

import http.server
import io
import ssl
import tarfile
import threading


def tar_of(members: dict[str, bytes], mode: str = "w:gz") -> bytes:
    """A tar archive (gzipped unless `mode` says "w") of these members, in this order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:   # type: ignore[call-overload]
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def serve_files(files: dict[str, bytes], context: ssl.SSLContext | None = None
                ) -> http.server.ThreadingHTTPServer:
    """Serve `files` by path (404 for any other) until `shutdown()`; over TLS with
    `context`. Files added to the dict later are served too."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = files.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    if context is not None:
        server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
