"""A payment with ``idempotent_call``: killed mid-charge, refunded once, never charged twice.

The example starts a small payment API on 127.0.0.1 (a thread of this
process) that counts the charges and refunds it performs. An order workflow
charges the customer through ``idempotent_call`` (an ``api`` critical
section) and registers a refund as the charge's compensation.

1. The kill arrives while the charge request is on the wire (the server
   holds the request until the kill was sent): it is deferred. The charge
   completes and its receipt is recorded durably; the kill lands as the call
   ends; the workflow rolls back and the refund runs, once.
2. The client, which never saw a receipt, submits the charge again under the
   same idempotency key: the recorded receipt is replayed, the server is not
   called, nothing is charged or refunded again.

The server's books end with one charge and one refund. The idempotency
records live in a temporary ``TERMSAFE_HOME``. Run it: ``python examples/payment.py``.
"""

from __future__ import annotations

import http.server
import json
import os
import tempfile
import threading
import urllib.request
from typing import Any

import termsafe as ts

WAIT = 30.0
SHOP = ts.Principal("shop-frontend", roles=["admin"])


class PaymentServer:
    """A local payment API: ``POST /charges`` and ``POST /refunds``, counted per key."""

    def __init__(self) -> None:
        self.charges: dict[str, int] = {}
        self.refunds: dict[str, int] = {}
        self.charge_received = threading.Event()
        self.release_charge = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                key = self.headers.get("Idempotency-Key", "")
                if self.path == "/charges":
                    server.charges[key] = server.charges.get(key, 0) + 1
                    server.charge_received.set()
                    server.release_charge.wait(WAIT)  # the request stays on the wire
                    reply = {"id": f"ch_{len(server.charges)}", "amount": body["amount"]}
                else:
                    server.refunds[key] = server.refunds.get(key, 0) + 1
                    reply = {"id": f"re_{len(server.refunds)}", "charge": body["charge"]}
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever)
        self._thread.start()

    def post(self, path: str, key: str, body: dict[str, Any]) -> dict[str, Any]:
        """Send one request with an ``Idempotency-Key`` header; return the JSON reply."""
        request = urllib.request.Request(  # noqa: S310 (the loopback server started above)
            self.url + path,
            data=json.dumps(body).encode(),
            headers={"Idempotency-Key": key, "Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=WAIT) as response:  # noqa: S310
            reply: dict[str, Any] = json.loads(response.read())
        return reply

    def close(self) -> None:
        self.release_charge.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(WAIT)


def charge(api: PaymentServer, order: dict[str, Any], log: list[str]) -> dict[str, Any]:
    """Charge the order once per idempotency key; a refund is its compensation."""

    def refund(payload: dict[str, Any]) -> None:
        receipt = api.post("/refunds", f"refund-{payload['charge']}", payload)
        log.append(f"compensation: refunded {payload['charge']} ({receipt['id']})")

    key = f"charge-order-{order['id']}"
    with ts.idempotent_call(key, request={"amount": order["amount"], "currency": "EUR"}) as call:
        if call.replayed:
            log.append(f"charge replayed from the record: {call.result['id']} (server not called)")
            result: dict[str, Any] = call.result
            return result
        receipt = api.post("/charges", call.key, {"amount": order["amount"]})
        call.compensate(refund, {"charge": receipt["id"]}, name="refund")
        call.record(receipt)
    log.append(f"charged {receipt['id']} for {order['amount']} cents")
    return receipt


def place_order(
    term: ts.Terminator, api: PaymentServer, order: dict[str, Any], log: list[str]
) -> None:
    """The order workflow: charge, then ship."""
    with term.workflow(f"order-{order['id']}", owner="shop-frontend"):
        receipt = charge(api, order, log)
        ts.checkpoint({"charged": receipt["id"]})
        log.append("shipped")  # reached only by a run that is not killed


def main() -> None:
    """Kill the order mid-charge, then retry it; check the server's books."""
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["TERMSAFE_HOME"] = tmp  # where the idempotency records are kept
        api = PaymentServer()
        order = {"id": 42, "amount": 1999}
        try:
            log: list[str] = []
            with ts.Terminator(phases=ts.Phases(graceful=5, forced=5)) as term:
                worker = threading.Thread(target=place_order, args=(term, api, order, log))
                worker.start()
                try:
                    assert api.charge_received.wait(WAIT), "the charge never reached the server"
                    handle = term.kill("order-42", by=SHOP, reason="customer cancelled")
                    print(f"kill while the charge is on the wire: deferred={handle.deferred}")
                    api.release_charge.set()
                    final = handle.wait(WAIT)
                finally:
                    api.release_charge.set()
                    worker.join(WAIT)
            print(f"first run: {final}; " + "; ".join(log))
            assert final == ts.WorkflowState.TERMINATED
            assert "shipped" not in log

            # The client never saw a receipt and submits the charge again.
            retry_log: list[str] = []
            with ts.Terminator() as term, term.workflow("order-42-resubmitted", owner="shop"):
                charge(api, order, retry_log)
            print("resubmitted (same key): " + "; ".join(retry_log))
            print(f"server books: charges {api.charges}, refunds {api.refunds}")
            assert api.charges == {"charge-order-42": 1}, "charged more than once"
            assert api.refunds == {"refund-ch_1": 1}, "refunded other than exactly once"
        finally:
            api.close()
        print("charged once, refunded once, replayed without charging: OK")


if __name__ == "__main__":
    main()
