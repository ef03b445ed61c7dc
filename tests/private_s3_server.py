"""Your own bucket, for tests: moto's S3 server with IAM authentication, refusing anonymous requests as AWS does.

`python tests/private_s3_server.py PORT`. Turn authentication on after setting up users (POST /moto-api/reset-auth).
moto checks signed requests itself (an unknown key or a missing permission is refused); a request with no signature at
all makes moto 5.2 fail with a 500 (it reads the missing Authorization header), so this filter answers it as S3 does:
403 AccessDenied. Its own API (/moto-api) stays open for the test's setup.
"""

from __future__ import annotations

import sys

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import run_simple

ACCESS_DENIED = b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>'


def refuse_anonymous(app):
    def wsgi(environ, start_response):
        signed = "HTTP_AUTHORIZATION" in environ or "X-Amz-Signature=" in environ.get("QUERY_STRING", "")
        if not signed and not environ.get("PATH_INFO", "").startswith("/moto-api"):
            body = b"" if environ["REQUEST_METHOD"] == "HEAD" else ACCESS_DENIED  # a HEAD answer has no body
            start_response("403 Forbidden", [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
            return [body]
        return app(environ, start_response)

    return wsgi


if __name__ == "__main__":
    run_simple("127.0.0.1", int(sys.argv[1]), refuse_anonymous(DomainDispatcherApplication(create_backend_app)), threaded=True)
