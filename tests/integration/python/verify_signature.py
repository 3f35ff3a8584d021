"""Verifies webhook deliveries with the reference Standard Webhooks library.

Reads one JSON document on stdin:
    {"secret": "whsec_...", "deliveries": [{"headers": {name: value}, "body_base64": "..."}]}
and prints one JSON list with, per delivery, {"ok": true} or {"ok": false, "error": "..."}.
"""

import base64
import json
import sys

from standardwebhooks.webhooks import Webhook, WebhookVerificationError


def main() -> None:
    request = json.load(sys.stdin)
    webhook = Webhook(request["secret"])
    results = []
    for delivery in request["deliveries"]:
        body = base64.b64decode(delivery["body_base64"])
        try:
            webhook.verify(body, delivery["headers"])
            results.append({"ok": True})
        except WebhookVerificationError as error:
            results.append({"ok": False, "error": str(error)})
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
