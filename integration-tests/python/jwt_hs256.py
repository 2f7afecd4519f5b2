"""Print an HS256 JWT for the claims given as JSON (argv[2]) signed with the raw key argv[1] (stdlib only).
Used by the mcp-authz tests with Envoy's jwt_authn and a local JWKS ({"kty":"oct"}).
"""

import base64
import hashlib
import hmac
import json
import sys


def b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def main() -> None:
    key = sys.argv[1].encode()
    claims = json.loads(sys.argv[2])
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "k1"}, separators=(",", ":")).encode())
    body = b64(json.dumps(claims, separators=(",", ":")).encode())
    sig = b64(hmac.new(key, f"{head}.{body}".encode(), hashlib.sha256).digest())
    print(f"{head}.{body}.{sig}")


if __name__ == "__main__":
    main()
